"""Block-wise search for mobilenet_v2 on tf_flowers, from Keras's ImageNet weights."""
from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "mobilenet_v2"
    return config
