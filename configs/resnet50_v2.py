"""Block-wise search for resnet50_v2 on tf_flowers, from Keras's ImageNet weights."""
from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50_v2"
    return config
