"""Any Keras model as a function of one flat parameter vector θ.

θ is `model.trainable_variables` flattened in order, each in C order; `Layout` lists
their names (the variables' paths without the model's own name), shapes and offsets.
`FlatModel` evaluates the model at any θ without touching its variables
(`stateless_call`), in inference mode (`training=False`: BatchNormalization on its
moving statistics, Dropout off), so a loss is a mean of per-sample terms. The
non-trainable variables stay as they are. Computing in another precision than the
model's own makes a copy of the model in that dtype (from its config), and keeps the
user's model as the place where θ is read and written back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import runtime
from ..errors import HessmpiError

DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class Tensor:
    """One trainable tensor inside θ: its name, shape and offset."""

    name: str
    shape: tuple
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def layer(self) -> str:
        return self.name.split("/")[0]


class Layout:
    """Where each trainable tensor sits in θ; what a results file stores under /model/layout."""

    def __init__(self, names, shapes, owner: str = "the model"):
        self.owner = owner  # who has these tensors, for messages
        tensors, offset = [], 0
        for name, shape in zip(names, shapes):
            tensors.append(Tensor(str(name), tuple(int(s) for s in shape), offset))
            offset += tensors[-1].size
        self.tensors = tuple(tensors)
        self.n_params = offset

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i]

    def __eq__(self, other):
        return isinstance(other, Layout) and self.tensors == other.tensors

    def split(self, theta: np.ndarray) -> list[np.ndarray]:
        """θ (or an eigenvector) cut into arrays of the tensors' shapes."""
        theta = np.asarray(theta)
        if theta.shape != (self.n_params,):
            raise HessmpiError(f"expected a vector of {self.n_params:,} entries, got shape {theta.shape}")
        return [theta[t.offset:t.offset + t.size].reshape(t.shape) for t in self.tensors]

    def layer_names(self) -> list[str]:
        """What `layer=` accepts: each layer (its tensors together, e.g. 'conv1') and each
        tensor ('conv1/kernel'), in θ order."""
        names = []
        for t in self.tensors:
            if "/" in t.name and t.layer not in names:
                names.append(t.layer)
            names.append(t.name)
        return names

    def block(self, name: str) -> slice:
        """The slice of θ holding layer or tensor `name`; HessmpiError listing the names."""
        tensors = [t for t in self.tensors if name in (t.name, t.layer)]
        if not tensors:
            raise HessmpiError(f"{self.owner} has no layer {name!r}: choose one of {', '.join(self.layer_names())}")
        return slice(min(t.offset for t in tensors), max(t.offset + t.size for t in tensors))

    def datasets(self, group: str = "model/layout") -> dict:
        """The layout as HDF5 datasets: names, shapes (padded with −1) and offsets."""
        rank = max((len(t.shape) for t in self.tensors), default=0)
        shapes = np.full((len(self.tensors), max(rank, 1)), -1, dtype=np.int64)
        for i, t in enumerate(self.tensors):
            shapes[i, :len(t.shape)] = t.shape
        return {f"{group}/names": np.array([t.name.encode() for t in self.tensors]),
                f"{group}/shapes": shapes,
                f"{group}/offsets": np.array([t.offset for t in self.tensors], dtype=np.int64)}

    @classmethod
    def from_datasets(cls, datasets: dict, group: str = "model/layout") -> "Layout":
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in datasets[f"{group}/names"]]
        shapes = [tuple(int(s) for s in row if s >= 0) for row in np.asarray(datasets[f"{group}/shapes"])]
        return cls(names, shapes)


def _rewrite_dtypes(config, dtype: str):
    """A copy of a serialized Keras config with every floating dtype (plain or DTypePolicy) set
    to dtype; integer dtypes (token inputs) stay."""
    floats = ("float16", "bfloat16", "float32", "float64")
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value in floats:
                value = dtype
            elif (key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy"
                  and value.get("config", {}).get("name") in floats):
                value = {**value, "config": {**value["config"], "name": dtype}}
            else:
                value = _rewrite_dtypes(value, dtype)
            out[key] = value
        return out
    if isinstance(config, list):
        return [_rewrite_dtypes(c, dtype) for c in config]
    return config


def copy_in_dtype(model, dtype: str):
    """The model rebuilt from its config with every floating dtype set to dtype, and its
    weights cast. HessmpiError if its config does not rebuild the same weights."""
    keras = runtime.import_keras()

    own = model.trainable_variables[0].dtype
    hint = (f"build the model with dtype='{dtype}', or analyse it in its own dtype ({own}); "
            f"a subclassed model needs a get_config that rebuilds it")
    try:
        config = _rewrite_dtypes(keras.saving.serialize_keras_object(model), dtype)
        copy = keras.saving.deserialize_keras_object(config, custom_objects={type(model).__name__: type(model)})
        weights = model.get_weights()
        if not copy.built or [tuple(w.shape) for w in copy.weights] != [w.shape for w in weights]:
            raise ValueError("the rebuilt model's weights have other shapes")
        copy.set_weights([w.astype(dtype) if w.dtype.kind == "f" else w for w in weights])
    except Exception as e:  # Keras raises many kinds for a config it cannot rebuild
        raise HessmpiError(f"cannot make a {dtype} copy of the model {model.name!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); {hint}") from None
    if any(v.dtype != dtype for v in copy.trainable_variables):
        raise HessmpiError(f"the {dtype} copy of the model {model.name!r} still has variables of another "
                           f"dtype; {hint}")
    return copy


class FlatModel:
    """A built Keras model as a function of the flat vector θ of its trainable variables.

    dtype is the precision of every computation ('float64' or 'float32'; None: the
    model's own). `name` labels results (default: the model's name). The model's own
    variables are where `params()` reads θ and `set_params` writes it.
    """

    def __init__(self, model, dtype: str | None = None, name: str | None = None):
        keras = runtime.import_keras()

        if not isinstance(model, keras.Model):
            raise HessmpiError(f"expected a Keras model (keras.Model), got {type(model).__name__}")
        if not model.built or not model.weights:
            raise HessmpiError(f"the model {model.name!r} is not built: call it on a batch, or give it an "
                               f"Input, before analysing it")
        variables = model.trainable_variables
        if not variables:
            raise HessmpiError(f"the model {model.name!r} has no trainable variables: nothing to analyse")
        own = {v.dtype for v in variables}
        if len(own) > 1 and dtype is None:
            raise HessmpiError(f"the model {model.name!r} mixes variable dtypes {sorted(own)}: pass dtype=")
        dtype = dtype or own.pop()
        if dtype not in DTYPES:
            raise HessmpiError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        self.source = model
        self.keras = model if all(v.dtype == dtype for v in variables) else copy_in_dtype(model, dtype)
        self.dtype = dtype
        self.name = name or model.name
        prefix = model.name + "/"
        names = [v.path[len(prefix):] if v.path.startswith(prefix) else v.path for v in variables]
        self.layout = Layout(names, [tuple(v.shape) for v in variables], self.name)
        self.n_params = self.layout.n_params
        self.kind = None  # 'softmax' or 'cnn' for a built-in model (models.builtin.build)
        self.config = {}  # a built-in model's construction settings (its tiny test variants)

    @classmethod
    def of(cls, model, dtype: str | None = None, name: str | None = None, like: "FlatModel | None" = None):
        """The FlatModel of a Keras model, shared by every analysis of that model in the same
        dtype and with the same trainable variables (kept on the model itself, so it goes
        with it), so that its TensorFlow functions are traced once. A copy in another dtype
        takes the model's non-trainable variables (BatchNormalization's statistics) again.
        like: a FlatModel of the same model whose built-in kind and settings this one keeps."""
        variables = getattr(model, "trainable_variables", None)
        dtypes = {v.dtype for v in variables or []}
        own = dtypes.pop() if len(dtypes) == 1 else None
        key = (dtype or own, name, tuple(v.path for v in variables or []))
        shared = model.__dict__.setdefault("_hessmpi_flat_models", {})  # past Keras' attribute tracking
        if key not in shared:
            shared[key] = cls(model, dtype, name)
            if like is not None:
                shared[key].kind, shared[key].config = like.kind, like.config
        flat = shared[key]
        if flat.keras is not model:
            for copy, own in zip(flat.keras.non_trainable_variables, model.non_trainable_variables):
                copy.assign(np.asarray(own.numpy()).astype(copy.dtype))
        return flat

    def describe(self) -> str:
        return f"{self.name}: {self.n_params:,} parameters ({len(self.layout)} tensors), {self.dtype}"

    # ---------------------------------------------------------------- θ in and out

    def params(self) -> np.ndarray:
        """θ now: the model's trainable variables flattened, as float64."""
        return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel()
                               for v in self.source.trainable_variables])

    def set_params(self, theta: np.ndarray) -> None:
        """Write θ into the model's trainable variables (and those of its copy)."""
        arrays = self.layout.split(np.asarray(theta, dtype=np.float64))
        for model in {id(self.source): self.source, id(self.keras): self.keras}.values():
            for v, a in zip(model.trainable_variables, arrays):
                v.assign(a.astype(v.dtype))

    # ---------------------------------------------------------------- TensorFlow (traced)

    def unflatten(self, theta):
        """The tensors of θ (a 1-D tf tensor) in their shapes."""
        tf = runtime.import_tensorflow()

        return [tf.reshape(theta[t.offset:t.offset + t.size], t.shape) for t in self.layout]

    def outputs(self, theta, x):
        """The model's outputs at θ for inputs x, in inference mode; no variable changes."""
        outputs, _ = self.keras.stateless_call(self.unflatten(theta), self._non_trainable(), x, training=False)
        return outputs

    def penalty(self, theta):
        """Σ of the weight regularizers of the variables (kernel_regularizer, …) at θ, or None."""
        terms = [(t, v.regularizer) for t, v in zip(self.unflatten(theta), self.keras.trainable_variables)
                 if getattr(v, "regularizer", None) is not None]
        if not terms:
            return None
        total = terms[0][1](terms[0][0])
        for value, regularizer in terms[1:]:
            total = total + regularizer(value)
        return total

    @property
    def has_penalty(self) -> bool:
        return any(getattr(v, "regularizer", None) is not None for v in self.keras.trainable_variables)

    def _non_trainable(self):
        return [v.value for v in self.keras.non_trainable_variables]

    def extra_losses(self, x) -> int:
        """How many data-dependent losses a call adds (activity regularizers, add_loss),
        which hessmpi does not include."""
        tf = runtime.import_tensorflow()

        theta = tf.constant(self.params(), self.dtype)
        _, _, losses = self.keras.stateless_call(self.unflatten(theta), self._non_trainable(), x,
                                                 training=False, return_losses=True)
        regularized = sum(getattr(v, "regularizer", None) is not None for v in self.keras.trainable_variables)
        return len(losses) - regularized
