# %% [markdown]
# # blockft_jax from a notebook
#
# Who this is for: users who work in Jupyter, Colab or Kaggle. Each `# %%` block is a cell
# (VS Code and Jupytext open this file as a notebook; `python docs/notebook.py` runs it whole,
# as the test suite does). It runs a short version of the offline demo: a MobileNetV2
# pretrained on digits 0-4, fine-tuned on 20 images per class of digits 5-9.

# %%
# On a CPU, one JAX device per physical core trains runs side by side, as the command line
# does. JAX reads its device count once, as it is first imported: this goes first, in a fresh
# kernel (it says None, and changes nothing, where JAX is already imported or XLA_FLAGS names a
# count).
from blockft_jax.common import cores
print("CPU devices:", cores.use_every_core())

# %%
from blockft_jax import api
from blockft_jax.inputs import data

# One call: a config's name (or a file, or a ConfigDict) and overrides by section. Progress
# appears line by line as the search goes; rerunning the cell resumes where it stopped.
result = api.run("demo", workdir="runs/notebook",
                 train={"epochs": 6, "seeds": 2},
                 search={"strategies": ("classifier_only", "layerwise", "full"),
                         "max_layers": 4})

# %%
# What it found: the winner, and whether it is really better than the simpler choice.
print("Winner:", result.winner["candidate"],
      f"(validation {result.winner['val_accuracy']['mean']:.3f})")
print(result.summary["verdict"])

# %%
# Every candidate, best first (`result.frame()` gives a pandas DataFrame when pandas is there).
for row in result.table[:6]:
    print(f"{row['candidate']:40s} {row['val_accuracy']:.3f} ± {row['val_accuracy_std']:.3f}")

# %%
# The winner classifies images: uint8 RGB of the model's input size (32 px for the demo).
digits = data.load_dataset("digits", image_size=32, classes=(5, 6, 7, 8, 9))
probabilities = result.predict(digits.validation.images[:8])
print("predicted:", [digits.class_names[i] for i in probabilities.argmax(axis=1)])
print("true:     ", [digits.class_names[i] for i in digits.validation.labels[:8]])
print("The model is saved in", result.model_path)
