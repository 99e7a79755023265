"""A user's own COCO-format dataset on disk with mixed aspect ratios (landscape images and one portrait one), and an
mmdet config that trains RetinaNet-R18 on it by epochs with validation, batching by aspect ratio as mmdet 3's
configs do (``AspectRatioBatchSampler``, which keeps its buckets on the sampler object).

``write(folder)`` writes ``folder/images/*.png``, ``folder/annotations.json`` and ``folder/config.py``."""

import json
import random
from pathlib import Path

CONFIG = """
_base_ = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"
model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=1))
load_from = None
data = dict(type="CocoDataset", data_root="{root}", ann_file="annotations.json", data_prefix=dict(img="images/"),
            metainfo=dict(classes=("box",)))
train_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                  dict(type="Resize", scale=(96, 64), keep_ratio=True), dict(type="RandomFlip", prob=0.5),
                  dict(type="PackDetInputs")]
test_pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(96, 64), keep_ratio=True),
                 dict(type="LoadAnnotations", with_bbox=True),
                 dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        sampler=dict(type="DefaultSampler", shuffle=True),
                        batch_sampler=dict(type="AspectRatioBatchSampler"),
                        dataset=dict(**data, filter_cfg=dict(filter_empty_gt=True, min_size=4),
                                     pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
                      sampler=dict(type="DefaultSampler", shuffle=False),
                      dataset=dict(**data, test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file="{root}/annotations.json", metric="bbox")
test_evaluator = val_evaluator
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=2, val_interval=1)
param_scheduler = []
optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.001, momentum=0.9, weight_decay=0.0001))
default_hooks = dict(logger=dict(type="LoggerHook", interval=1), checkpoint=dict(type="CheckpointHook", interval=2))
"""


def write(folder: Path, landscape: int = 9, portrait: int = 1, seed: int = 0) -> Path:
    import mmcv
    import numpy as np

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(landscape + portrait):
        w, h = (96, 64) if i < landscape else (64, 96)
        img = np.random.default_rng(seed + i).integers(0, 60, (h, w, 3), dtype=np.uint8)
        bw, bh = rng.randint(w // 4, w // 2), rng.randint(h // 4, h // 2)
        x, y = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
        img[y : y + bh, x : x + bw] = 200
        annotations.append(dict(id=i + 1, image_id=i + 1, category_id=1, bbox=[x, y, bw, bh], area=bw * bh, iscrowd=0))
        mmcv.imwrite(img, str(folder / "images" / f"{i:04d}.png"))
        images.append(dict(id=i + 1, file_name=f"{i:04d}.png", width=w, height=h))
    coco = dict(images=images, annotations=annotations, categories=[dict(id=1, name="box")])
    (folder / "annotations.json").write_text(json.dumps(coco))
    config = folder / "config.py"
    config.write_text(CONFIG.replace("{root}", str(folder)))
    return config
