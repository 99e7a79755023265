# As retinanet_late_aux.py, with the auxiliary head used at random: seed 17 with use_p=0.4 skips it in both
# observed first steps on both ranks, and uses it in training steps 3 (rank 1), 4 and 5 (rank 0).
_base_ = "./retinanet_late_aux.py"
model = dict(mode="random", use_p=0.4, seed=17)
