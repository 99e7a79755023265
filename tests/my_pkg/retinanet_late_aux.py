# An mmdet config of a user's own: mmdet's RetinaNet-R18 with the detector swapped for my_pkg's subclass.
_base_ = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"
custom_imports = dict(imports=["my_pkg.mmdet_aux"], allow_failed_imports=False)
model = dict(type="RetinaNetWithLateAux", late_from=3)
