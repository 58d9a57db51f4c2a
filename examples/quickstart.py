#!/usr/bin/env python3
"""The README's quickstart: the Hessian of your own saved Keras model on your own data.

    python examples/quickstart.py              # one process (a notebook runs the same lines)
    mpirun -n 2 python examples/quickstart.py  # the same numbers, each rank holding half the samples

Reads model.keras and data.npz from the current folder (examples/make_model.py makes them),
writes top.h5 and top.png.
"""

import numpy as np
import tensorflow as tf

import hessmpi

model = tf.keras.models.load_model("model.keras")      # Sequential, functional or subclassed
data = np.load("data.npz")
H = hessmpi.Hessian(model, (data["x_train"], data["y_train"]))  # the compiled loss, or loss=...
top = hessmpi.eigenpairs(H, k=10)                       # values, vectors, true residuals, error bars
top.save("top.h5")
top.plot("top.png")                                     # top.plot() shows it inline in a notebook
