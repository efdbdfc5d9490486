"""Your own photos: one subfolder per class under photos/ (photos/cats/1.jpg, photos/dogs/2.jpg,
...), fine-tuned from Keras's ImageNet MobileNetV2 at 224 px.

    python -m blockft_jax.main --config configs/photos.py --dry_run   # lists the classes found
    python -m blockft_jax.main --config configs/photos.py             # results in runs/photos

Another folder: --config.data.path=DIR. The search's winner is saved in runs/photos/models/best.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "image_folder"
    config.data.path = "photos"  # relative to where the command runs
    return config
