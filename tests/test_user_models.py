"""hessmpi on users' own Keras models, against dense Hessians built independently of hessmpi.

The tiny models of tests/user_models.py (BatchNormalization and Dropout, a residual CNN,
two named inputs, Embedding + GRU, regression with MSE, Huber and a per-sample callable,
an autoencoder, a subclassed model, kernel regularizers, a float32 model analysed in
float64) go through the public API only: `hessmpi.Hessian`, `hessmpi.GGN`,
`hessmpi.eigenpairs`, `hessmpi.load_model`, `hessmpi.read_results`, `hessmpi.Layout`.

The references use none of hessmpi's code: the Keras model is called directly
(`model(x, training=False)`), the loss is the Keras loss *function* in float64, averaged
over the samples, plus `sum(model.losses)` for a model with weight regularizers, and the
dense Hessian is `tape.jacobian` of the gradient with respect to the model's own
`trainable_variables`, flattened in order (C order). `test_wrong_references_are_caught`
shows that a reference with the wrong mode, loss, penalty or layout fails these checks.

Runs single-rank and under `mpirun -n 2/3`: every rank builds the same models and data
(7 samples: uneven shards at 2 and 3 ranks) and the same references; assertions are
collective.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import runtime

runtime.configure_threads(1)
tf = runtime.import_tensorflow()

import keras  # noqa: E402

import hessmpi  # noqa: E402
import user_models  # noqa: E402
from mpi_util import collective_assert, comm  # noqa: E402

COMM = comm()
N = 7               # samples: 3+2+2 at 3 ranks, 4+3 at 2
PRODUCT_TOL = 1e-10  # ‖H_op − H‖_F / ‖H‖_F
EIGEN_TOL = 1e-8     # |λ_op − λ| / max|λ|
SAME_TOL = 1e-12     # the same operator by two routes


def silent(line):
    pass


def rel_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius for matrices)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def random_vectors(n: int, k: int, seed: int) -> np.ndarray:
    """n × k random vectors, the same on every rank."""
    return np.random.default_rng(seed).standard_normal((n, k))


# ---------------------------------------------------------------- the cases


def _rng(seed):
    return np.random.default_rng(seed)


def sparse_ce_logits(y, z):
    return keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)


def quartic(y_true, y_pred):
    """A per-sample callable returning one value per element (n, 2): hessmpi averages them."""
    d = y_pred - y_true
    return d ** 2 + 0.1 * d ** 4


def case_mlp_bn():
    """BatchNormalization (moving statistics ≠ 0, 1) and Dropout; the compiled loss."""
    model = user_models.mlp_bn()
    x, y = _rng(10).standard_normal((N, 4)), _rng(11).integers(0, 3, N)
    return dict(model=model, x=x, y=y, loss=None, reference=sparse_ce_logits)


def case_cnn_residual():
    model = user_models.cnn_residual()
    x, y = _rng(12).uniform(0, 1, (N, 5, 5, 1)), _rng(13).integers(0, 3, N)
    return dict(model=model, x=x, y=y, loss="sparse_categorical_crossentropy", options={"from_logits": True},
                reference=sparse_ce_logits)


def case_two_inputs():
    """Two named inputs (a dict) and one-hot targets for categorical cross-entropy from logits."""
    model = user_models.two_inputs()
    x = {"image": _rng(14).uniform(0, 1, (N, 4, 4, 1)), "extra": _rng(15).standard_normal((N, 3))}
    y = np.eye(3)[_rng(16).integers(0, 3, N)]
    return dict(model=model, x=x, y=y, loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                reference=lambda y, z: keras.losses.categorical_crossentropy(y, z, from_logits=True))


def case_gru():
    model = user_models.gru_tokens()
    x, y = _rng(17).integers(0, 7, (N, 4)).astype(np.int32), _rng(18).integers(0, 2, N)
    return dict(model=model, x=x, y=y, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                reference=sparse_ce_logits)


def _regression_data():
    return _rng(19).standard_normal((N, 3)), _rng(20).standard_normal((N, 2))


def case_mse():
    x, y = _regression_data()
    return dict(model=user_models.regression_mlp(), x=x, y=y, loss="mse",
                reference=keras.losses.mean_squared_error)


def case_huber():
    """Huber with delta 0.5 as a keras.losses object: residuals on both sides of delta."""
    x, y = _regression_data()
    return dict(model=user_models.regression_mlp(), x=x, y=y, loss=keras.losses.Huber(delta=0.5),
                reference=lambda y, z: keras.losses.huber(y, z, delta=0.5))


def case_callable():
    x, y = _regression_data()
    return dict(model=user_models.regression_mlp(), x=x, y=y, loss=quartic, reference=quartic)


def case_autoencoder():
    x = _rng(21).standard_normal((N, 4))
    return dict(model=user_models.autoencoder(), x=x, y=x, loss="mse", reference=keras.losses.mean_squared_error)


def case_subclassed():
    """A subclassed model with one logit and 0/1 targets (binary cross-entropy from logits)."""
    x, y = _rng(22).standard_normal((N, 3)), _rng(23).integers(0, 2, (N, 1)).astype(np.float64)
    return dict(model=user_models.subclassed(), x=x, y=y, loss=keras.losses.BinaryCrossentropy(from_logits=True),
                reference=lambda y, z: keras.losses.binary_crossentropy(y, z, from_logits=True))


def case_regularized():
    """L2 and L1+L2 kernel regularizers, which the objective includes; softmax probabilities."""
    x, y = _rng(24).standard_normal((N, 4)), np.eye(3)[_rng(25).integers(0, 3, N)]
    return dict(model=user_models.regularized(), x=x, y=y, loss="categorical_crossentropy",
                reference=keras.losses.categorical_crossentropy, penalty=True)


def case_float32():
    """A float32 model (BatchNormalization included) analysed with dtype='float64': hessmpi
    computes on a float64 copy; the reference is a float64 build with the same weights."""
    model = user_models.mlp_bn(seed=8, dtype="float32")
    twin = user_models.mlp_bn(seed=9, dtype="float64")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    x, y = _rng(26).standard_normal((N, 4)), _rng(27).integers(0, 3, N)
    return dict(model=model, x=x, y=y, loss=None, options={"dtype": "float64"}, reference=sparse_ce_logits,
                reference_model=twin)


CASES = {"mlp_bn": case_mlp_bn, "cnn_residual": case_cnn_residual, "two_inputs": case_two_inputs,
         "gru": case_gru, "mse": case_mse, "huber": case_huber, "callable": case_callable,
         "autoencoder": case_autoencoder, "subclassed": case_subclassed, "regularized": case_regularized,
         "float32": case_float32}
GGN_CASES = ("mlp_bn", "two_inputs", "mse", "regularized", "gru")


# ---------------------------------------------------------------- independent references


def _flat_jacobian(blocks, rows: int) -> np.ndarray:
    """The jacobian's blocks (one per variable, rows × *shape) side by side: rows × n."""
    return np.concatenate([np.reshape(tf.convert_to_tensor(b).numpy(), (rows, -1)) for b in blocks], axis=1)


def objective(model, x, y, loss_fn, penalty: bool, training: bool = False):
    """The mean of the Keras loss function over the samples (+ Σ model.losses)."""
    value = tf.reduce_mean(loss_fn(y, model(x, training=training)))
    if penalty:
        value = value + tf.add_n(model.losses)
    return value


def dense_hessian(model, x, y, loss_fn, penalty=False, training=False, order="C") -> np.ndarray:
    """∂²objective/∂θ² by nested GradientTapes over model.trainable_variables, θ their
    values flattened in order (order='F' gives a deliberately wrong layout)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = objective(model, x, y, loss_fn, penalty, training)
        grads = inner.gradient(value, variables)
        g = tf.concat([tf.reshape(tf.transpose(tf.convert_to_tensor(gr)) if order == "F" else
                                  tf.convert_to_tensor(gr), [-1]) for gr in grads], 0)
    n = int(g.shape[0])
    blocks = outer.jacobian(g, variables, experimental_use_pfor=False)
    if order == "F":
        blocks = [tf.reshape(tf.transpose(tf.reshape(b, (n, *v.shape)),
                                          [0, *range(len(v.shape), 0, -1)]), (n, -1))
                  for b, v in zip(blocks, variables)]
    return _flat_jacobian(blocks, n)


def dense_ggn(model, x, y, loss_fn, penalty=False) -> np.ndarray:
    """Σᵢ Jᵢᵀ Mᵢ Jᵢ / N (+ ∇²penalty): Jᵢ the Jacobian of sample i's outputs with respect to
    θ, Mᵢ the Hessian of the mean loss's terms in those outputs."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        z = model(x, training=False)
    n_out = int(np.prod(z.shape[1:]))
    J = _flat_jacobian(tape.jacobian(z, variables, experimental_use_pfor=False), N * n_out)
    J = J.reshape(N, n_out, -1)
    zc = tf.constant(z.numpy())
    with tf.GradientTape() as outer:
        outer.watch(zc)
        with tf.GradientTape() as inner:
            inner.watch(zc)
            value = tf.reduce_mean(loss_fn(y, zc)) * N  # Σ of the per-sample terms
        gz = inner.gradient(value, zc)
    M = outer.jacobian(gz, zc).numpy().reshape(N, n_out, N, n_out)
    G = sum(J[i].T @ M[i, :, i, :] @ J[i] for i in range(N)) / N
    if penalty:
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                value = tf.add_n(model.losses)
            grads = inner.gradient(value, variables)  # None for the biases
            g = tf.concat([tf.reshape(np.zeros(v.shape) if gr is None else gr, [-1])
                           for gr, v in zip(grads, variables)], 0)
        n = int(g.shape[0])
        blocks = outer.jacobian(g, variables, experimental_use_pfor=False)
        G = G + _flat_jacobian([np.zeros((n, *v.shape)) if b is None else b for b, v in zip(blocks, variables)], n)
    return G


# ---------------------------------------------------------------- shared, built once per module


class Zoo:
    """The cases made concrete on first use and kept: model, data, the hessmpi Hessian on
    COMM_WORLD, the dense reference and its eigenvalues, the operator's columns."""

    def __init__(self):
        self.cases = {}

    def __getitem__(self, name):
        if name not in self.cases:
            spec = {"options": {}, "penalty": False, "reference_model": None, **CASES[name]()}
            c = SimpleNamespace(name=name, **spec)
            c.data = (c.x, c.y)
            c.H = hessmpi.Hessian(c.model, c.data, c.loss, **c.options)
            c.dense = dense_hessian(c.reference_model or c.model, c.x, c.y, c.reference, c.penalty)
            c.eigenvalues = np.linalg.eigvalsh(c.dense)
            c.columns = None
            self.cases[name] = c
        return self.cases[name]

    def columns(self, name):
        """The operator applied to every unit vector: the matrix of hessmpi's Hessian."""
        c = self[name]
        if c.columns is None:
            c.columns = c.H @ np.eye(c.H.n)
        return c.columns


@pytest.fixture(scope="module")
def zoo():
    return Zoo()


# ---------------------------------------------------------------- (a) products, (b) eigenvalues


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_columns_match_dense(zoo, name):
    c = zoo[name]
    n = sum(int(np.prod(v.shape)) for v in c.model.trainable_variables)
    cols = zoo.columns(name)  # one block product of n columns
    single = max(rel_error(c.H @ e, cols[:, j]) for j, e in ((0, np.eye(n)[0]), (n - 1, np.eye(n)[-1])))
    error = rel_error(cols, c.dense)
    asym = rel_error(c.dense, c.dense.T) if c.dense.any() else 1.0
    flat = c.H.problem.model
    # float32: hessmpi computes on a float64 copy and leaves the user's model as it was
    copy_ok = name != "float32" or (flat.dtype == "float64" and flat.keras is not c.model
                                    and all(v.dtype == "float32" for v in c.model.weights))
    collective_assert(c.H.n == n == c.dense.shape[0] and error <= PRODUCT_TOL and asym <= 1e-12 and copy_ok
                      and single <= SAME_TOL,
                      f"{name}: {c.H.n} parameters for the operator, {n} in the model; "
                      f"‖H_op − H‖/‖H‖ = {error:.2e}, dense asymmetry {asym:.2e}, float64 copy {copy_ok}, "
                      f"single products vs the block's columns {single:.2e}")


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", list(CASES))
def test_extreme_eigenvalues_match_dense(zoo, name, which):
    c = zoo[name]
    k = 3
    pairs = hessmpi.eigenpairs(c.H, k=k, which=which, error_groups=0, tol=1e-10, log=silent)
    expected = c.eigenvalues[::-1][:k] if which == "largest" else c.eigenvalues[:k]
    scale = np.abs(c.eigenvalues).max()
    gaps = np.abs(np.asarray(pairs.values) - expected) / scale if len(pairs.values) == k else [np.inf]
    collective_assert(max(gaps) <= EIGEN_TOL,
                      f"{name} {which}: hessmpi {np.asarray(pairs.values)}, dense {expected}, "
                      f"relative gaps {np.asarray(gaps)}")


# ---------------------------------------------------------------- (c) the GGN


@pytest.mark.parametrize("name", GGN_CASES)
def test_ggn_matches_dense_ggn(zoo, name):
    c = zoo[name]
    G = hessmpi.GGN(c.H)  # the same problem
    cols = G @ np.eye(G.n)
    dense = dense_ggn(c.model, c.x, c.y, c.reference, c.penalty)
    error = rel_error(cols, dense)
    apart = rel_error(dense, c.dense)  # the GGN is not the Hessian for these models
    lowest = np.linalg.eigvalsh(dense)[0] / np.abs(dense).max()
    collective_assert(error <= PRODUCT_TOL and apart >= 1e-3 and lowest >= -1e-12,
                      f"{name}: ‖G_op − G‖/‖G‖ = {error:.2e}, ‖G − H‖/‖H‖ = {apart:.2e}, "
                      f"smallest eigenvalue of G / max|G| = {lowest:.2e}")


# ---------------------------------------------------------------- (d) ranks


def test_world_equals_one_rank(zoo):
    """Under mpirun, the operator over all ranks equals each rank's operator over all
    samples alone (MPI.COMM_SELF): products and the top eigenvalues."""
    if COMM.Get_size() == 1:
        pytest.skip("one rank: COMM_WORLD is COMM_SELF; run under mpirun -n 2 or 3")
    c = zoo["gru"]
    alone = hessmpi.Hessian(c.H.problem.model, c.data, c.loss, comm=MPI.COMM_SELF)  # traced functions reused
    V = random_vectors(c.H.n, 4, seed=30)
    error = rel_error(c.H @ V, alone @ V)
    world = hessmpi.eigenpairs(c.H, k=3, error_groups=0, tol=1e-10, log=silent).values
    self_ = hessmpi.eigenpairs(alone, k=3, error_groups=0, tol=1e-10, log=silent).values
    gap = np.abs(world - self_).max() / np.abs(self_).max()
    collective_assert(alone.comm.Get_size() == 1 and c.H.comm.Get_size() == COMM.Get_size()
                      and error <= SAME_TOL and gap <= 1e-9,
                      f"{COMM.Get_size()} ranks vs one: products differ by {error:.2e}, top eigenvalues "
                      f"{world} vs {self_}")


# ---------------------------------------------------------------- (e) tf.data


@pytest.mark.parametrize("batched", [False, True], ids=["samples", "batched"])
@pytest.mark.parametrize("name", ["two_inputs", "gru", "autoencoder", "subclassed"])
def test_dataset_equals_arrays(zoo, name, batched):
    c = zoo[name]
    if name == "autoencoder":  # x alone, mapped to (x, x)
        dataset = tf.data.Dataset.from_tensor_slices(c.x).map(lambda x: (x, x))
    else:
        dataset = tf.data.Dataset.from_tensor_slices((c.x, c.y))
    if batched:
        dataset = dataset.batch(3)  # 3 + 3 + 1: hessmpi unbatches it
    # The same FlatModel (hessmpi.FlatModel is accepted as a model): its traced functions are reused
    H = hessmpi.Hessian(c.H.problem.model, dataset, c.loss, **c.options)
    V = random_vectors(c.H.n, 3, seed=31)
    error = rel_error(H @ V, c.H @ V)
    collective_assert(H.problem.n_samples == N and error <= SAME_TOL,
                      f"{name}: {H.problem.n_samples} samples from the dataset, products differ by {error:.2e}")
    if batched:  # n_samples counts samples, not batches: 5 of them are more than the 3 batches
        first = hessmpi.Hessian(c.H.problem.model, dataset, c.loss, n_samples=5, **c.options)
        arrays = hessmpi.Hessian(c.H.problem.model, c.data, c.loss, n_samples=5, **c.options)
        error = rel_error(first @ V, arrays @ V)
        collective_assert(first.problem.n_samples == 5 and error <= SAME_TOL,
                          f"{name}, n_samples=5: {first.problem.n_samples} samples, products differ by {error:.2e}")


# ---------------------------------------------------------------- (f) results back into Keras


def _relative_path(variable, model) -> str:
    prefix = model.name + "/"
    return variable.path[len(prefix):] if variable.path.startswith(prefix) else variable.path


@pytest.mark.parametrize("name", ["mlp_bn", "gru"])
def test_results_load_back_into_keras(zoo, name, shared_tmp_path):
    c = zoo[name]
    top = hessmpi.eigenpairs(c.H, k=2, error_groups=0, tol=1e-10, log=silent)
    path = str(shared_tmp_path / f"{name}.h5")
    top.save(path)  # rank 0 writes
    COMM.Barrier()
    datasets, attrs = hessmpi.read_results(path, "spectrum")
    layout = hessmpi.Layout.from_datasets(datasets)
    params = layout.split(datasets["model/params"])
    vector = datasets["spectrum/eigenvectors"][0]
    direction = layout.split(vector)

    builder = getattr(user_models, {"mlp_bn": "mlp_bn", "gru": "gru_tokens"}[name])
    fresh = builder(seed=99)  # the same architecture, other weights
    by_name = dict(zip([t.name for t in layout], params))
    names_ok = [_relative_path(v, fresh) for v in fresh.trainable_variables] == [t.name for t in layout]
    for v in fresh.trainable_variables:
        v.assign(by_name[_relative_path(v, fresh)])
    original = {_relative_path(v, c.model): v.numpy() for v in c.model.trainable_variables}
    weights_ok = all(np.array_equal(v.numpy(), original[_relative_path(v, fresh)])
                     for v in fresh.trainable_variables)
    for v, a in zip(fresh.trainable_variables, direction):
        v.assign(a)
    direction_ok = all(np.array_equal(v.numpy(), a) for v, a in zip(fresh.trainable_variables, direction))
    flat_ok = np.array_equal(np.concatenate([v.numpy().ravel() for v in fresh.trainable_variables]), vector)
    eigen_ok = rel_error(c.H @ vector, top.values[0] * vector) <= 1e-8
    collective_assert(names_ok and weights_ok and direction_ok and flat_ok and eigen_ok
                      and np.array_equal(vector, top.vectors[0]) and attrs["n_params"] == c.H.n,
                      f"{name}: names {names_ok}, weights {weights_ok}, eigenvector arrays {direction_ok}, "
                      f"flattened {flat_ok}, H v = λ v {eigen_ok}")


# ---------------------------------------------------------------- (g) model specs


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # never trained
def test_saved_keras_file_gives_the_same_hessian(zoo, tmp_path):
    """FILE.keras (BatchNormalization's statistics and the compiled loss saved with it)."""
    c = zoo["mlp_bn"]
    path = str(tmp_path / "mlp_bn.keras")
    c.model.save(path)
    flat = hessmpi.load_model(path)
    H = hessmpi.Hessian(flat, c.data)  # the compiled loss, restored
    H2 = hessmpi.Hessian(path, c.data)
    V = random_vectors(c.H.n, 3, seed=32)
    errors = [rel_error(H @ V, c.H @ V), rel_error(H2 @ V, c.H @ V)]
    collective_assert(flat.name == path and flat.layout == c.H.problem.model.layout and max(errors) <= SAME_TOL,
                      f"{path}: products differ by {errors}; layout {[t.name for t in flat.layout]}")


def test_module_function_spec_gives_the_same_hessian(zoo):
    c = zoo["mse"]
    spec = "user_models:regression_mlp"
    flat = hessmpi.load_model(spec)
    H = hessmpi.Hessian(spec, c.data, "mse")
    V = random_vectors(c.H.n, 3, seed=33)
    error = rel_error(H @ V, c.H @ V)
    collective_assert(flat.name == spec and flat.n_params == c.H.n and error <= SAME_TOL,
                      f"{spec}: products differ by {error:.2e}")


# ---------------------------------------------------------------- the checks can fail


def test_wrong_references_are_caught(zoo):
    """Each comparison above would fail for a reference with a mistake: training mode
    (BatchNormalization on batch statistics), another loss (Huber's default delta), the
    penalty left out, or θ flattened in Fortran order."""
    wrong = {}
    c = zoo["mlp_bn"]
    tf.random.set_seed(0)
    wrong["training=True"] = (dense_hessian(c.model, c.x, c.y, c.reference, training=True), zoo.columns("mlp_bn"))
    c = zoo["huber"]
    wrong["delta 1.0"] = (dense_hessian(c.model, c.x, c.y, lambda y, z: keras.losses.huber(y, z, delta=1.0)),
                          zoo.columns("huber"))
    c = zoo["regularized"]
    wrong["no penalty"] = (dense_hessian(c.model, c.x, c.y, c.reference, penalty=False), zoo.columns("regularized"))
    wrong["Fortran order"] = (dense_hessian(c.model, c.x, c.y, c.reference, penalty=True, order="F"),
                              zoo.columns("regularized"))
    errors = {what: rel_error(cols, H) for what, (H, cols) in wrong.items()}
    collective_assert(min(errors.values()) >= 1e-3, f"a wrong reference passes: {errors}")
