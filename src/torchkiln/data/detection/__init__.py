"""Object detection data: COCO and CSV boxes, the annotation audit, box-aware transforms, the
variable-box collate, statistics, prediction writers and the generated shapes demo."""
