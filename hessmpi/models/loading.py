"""A model from its spec: 'softmax' or 'cnn' (built in), FILE.keras (a saved Keras model), or
module:function (a function returning a built Keras model)."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
import zipfile

from .. import runtime
from ..errors import HessmpiError
from . import builtin


def kind_of(spec: str) -> str:
    """'builtin', 'file' or 'function' for a model spec, checked without TensorFlow:
    HessmpiError for an unknown name, a missing or non-Keras file, or a malformed
    module:function."""
    if spec in builtin.MODELS:
        return "builtin"
    if spec.endswith((".keras", ".h5")) or os.sep in spec or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise HessmpiError(f"--model {spec}: no such file")
        if spec.endswith(".h5"):
            raise HessmpiError(f"--model {spec}: a legacy HDF5 model; save it again as .keras "
                               f"(model.save('model.keras')) to analyse it")
        if not zipfile.is_zipfile(spec):
            raise HessmpiError(f"--model {spec}: not a Keras model file (a .keras file is a zip archive "
                               f"written by model.save)")
        return "file"
    module, sep, function = spec.partition(":")
    if sep and module and function.isidentifier():
        return "function"
    raise HessmpiError(f"unknown model {spec!r}: choose {', '.join(builtin.MODELS)}, a saved Keras model "
                       f"(FILE.keras) or module:function (a function returning a built Keras model)")


def load_model(spec: str, dtype: str | None = None, seed: int = 0):
    """The FlatModel of a spec, computing in dtype (None: float64 for a built-in model, the
    model's own dtype otherwise); seed sets a built-in model's initialisation. Its name in
    results is the spec."""
    from .keras_model import FlatModel

    kind = kind_of(spec)
    if kind == "builtin":
        return builtin.build(spec, dtype or "float64", seed)
    keras = runtime.import_keras()

    from . import layers  # noqa: F401  (registers the built-in models' layers for loading)

    if kind == "file":
        try:
            with warnings.catch_warnings():  # hessmpi never uses the optimizer's state
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model = keras.models.load_model(spec)
        except Exception as e:  # Keras raises many kinds for a file it cannot read
            raise HessmpiError(f"--model {spec}: cannot load it as a Keras model ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]})") from None
    else:
        module_name, _, function = spec.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise HessmpiError(f"--model {spec}: cannot import {module_name} ({e})") from None
        if not callable(getattr(module, function, None)):
            raise HessmpiError(f"--model {spec}: {module_name} has no function {function}")
        model = getattr(module, function)()
    if not isinstance(model, keras.Model):
        raise HessmpiError(f"--model {spec}: not a Keras model (got {type(model).__name__})")
    return FlatModel(model, dtype, name=spec)
