#!/usr/bin/env python3
"""Make the quickstart's inputs: a small Keras classifier trained briefly on 1,000 bundled
digits, saved as model.keras, and its data as data.npz (Keras' mnist.npz keys).

    python examples/make_model.py [FOLDER]

Stands in for the model and data you already have.
"""

import os
import sys

import numpy as np
import tensorflow as tf

import hessmpi

folder = sys.argv[1] if len(sys.argv) > 1 else "."
digits = hessmpi.load_dataset("mnist-5k", n_samples=1000)
x, y = digits.features().reshape(1000, 784).astype("float32"), digits.y
tf.keras.utils.set_random_seed(0)
model = tf.keras.Sequential([tf.keras.Input((784,)), tf.keras.layers.Dense(16, activation="tanh"),
                             tf.keras.layers.Dense(10)])
model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=3, batch_size=50, verbose=0)
model.save(os.path.join(folder, "model.keras"))
np.savez(os.path.join(folder, "data.npz"), x_train=x, y_train=y)
print(f"wrote {os.path.join(folder, 'model.keras')} ({model.count_params():,} parameters) and "
      f"{os.path.join(folder, 'data.npz')} ({len(y)} samples)")
