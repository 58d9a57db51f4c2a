"""Models: the built-in softmax regression and CNN as Keras models, any Keras model as a
function of a flat θ, model specs (name, file, module:function), and losses."""

from .builtin import MODELS, build, init, layout
from .keras_model import DTYPES, FlatModel, Layout, Tensor, copy_in_dtype
from .loading import load_model
from .losses import Loss, resolve

__all__ = ["DTYPES", "FlatModel", "Layout", "Loss", "MODELS", "Tensor", "build", "copy_in_dtype", "init",
           "layout", "load_model", "resolve"]
