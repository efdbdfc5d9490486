"""Block-wise search for vgg16 on tf_flowers, from Keras's ImageNet weights."""
from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "vgg16"
    return config
