"""Block-wise search for mobilenet_v3_small on tf_flowers, from Keras's ImageNet weights."""
from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "mobilenet_v3_small"
    return config
