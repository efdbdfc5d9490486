"""What a search reads: datasets in memory, decoded and preprocessed once (data), and Keras
weight files converted to Flax variables (weights)."""
