"""Sharding over a device mesh with `data` and `model` axes, by logical-axis rules (as T5X's partitioner does).

Every array dimension that matters gets a logical name (`batch`, `heads`, `kv_heads`, `mlp`, `vocab`, `embed`,
...); `RULES` maps logical names to mesh axes (batch -> data; heads, kv_heads, mlp, vocab -> model), and a
`Partitioner` turns names and shapes into `NamedSharding`s. A dimension that a mesh axis cannot divide (2 kv heads
on a model axis of 4, a batch of 3 on a data axis of 2) falls back to replication instead of failing, and the
partitioner logs it once.

Where the names come from:
  - parameters: `PARAM_AXES`, regular expressions matched against the end of a parameter's path, so the same
    rules cover a LlamaLM's params, a draft model nested in a dict, BPD heads, optimizer states (whose paths end in
    the param's) and stacked layers (extra leading dimensions are replicated). Anything unmatched is replicated.
  - KV caches (`jaxspec.models.cache.KVCache`): keys `[B, K, H, S]`, values `[B, K, S, H]`, lengths `[B]`.
  - loop state and batches: the shape suffix of a field's name (`tokens_BxO`: B is the batch), or dimension 0 of
    a training batch.

A mesh is written `"data=2,model=4"` (-1 fills in the devices left over) and must use every device; the model is
the same program on any mesh, so sharded decoding gives the tokens of unsharded decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxspec.errors import InputError

logger = logging.getLogger(__name__)

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (None: replicated). Data in the T5X manner: a list of pairs, first match wins.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("heads", MODEL),
    ("kv_heads", MODEL),
    ("mlp", MODEL),
    ("vocab", MODEL),
    ("embed", None),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
)

# Parameter path (its end, '/'-joined) -> logical axes of its last dimensions.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"attn/q/kernel$", ("embed", "heads")),
    (r"attn/[kv]/kernel$", ("embed", "kv_heads")),
    (r"attn/o/kernel$", ("heads", "embed")),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/down/kernel$", ("mlp", "embed")),
    (r"attn/q/bias$", ("heads",)),  # biases (Qwen2; LLaMA's attention_bias / mlp_bias) split with their kernels
    (r"attn/[kv]/bias$", ("kv_heads",)),
    (r"attn/o/bias$", ("embed",)),
    (r"mlp/(gate|up)/bias$", ("mlp",)),
    (r"mlp/down/bias$", ("embed",)),
    (r"(^|/)shared/embedding$", ("vocab", "embed")),  # T5 (jaxspec.models.t5): shared embedding, gated-GELU MLP
    (r"mlp/wi(_0|_1)?/kernel$", ("embed", "mlp")),
    (r"mlp/wo/kernel$", ("mlp", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)heads/w_in$", (None, "embed", "mlp")),  # BPD heads (jaxspec.models.bpd): [M, D(+D), F]
    (r"(^|/)heads/b_in$", (None, "mlp")),
    (r"(^|/)heads/w_out$", (None, "mlp", "embed")),
    (r"(^|/)proj_DxM$", ("embed", "vocab")),  # BPD heads' output projection (decode and training)
    (r"(^|/)embed_VxD$", ("vocab", "embed")),  # the target embedding BPD heads read
)

# Shape letters of field names (STYLE.md's glossary) that name a logical axis; the others stay replicated.
_LETTER_AXES = {"B": "batch"}
_SHAPE_SUFFIX = re.compile(r"_([A-Z][A-Za-z0-9]*(?:x[A-Z][A-Za-z0-9]*)*)$")


# ---- meshes ----------------------------------------------------------------------------------------------------

def parse_mesh_shape(spec: str | Sequence[int]) -> dict[str, int]:
  """`"data=2,model=4"`, `"2,4"` or `(2, 4)` -> `{"data": 2, "model": 4}`; a missing axis is 1, -1 fills in."""
  shown = spec  # what the user wrote, for messages
  if isinstance(spec, str):
    text = re.sub(r"\s", "", spec)
    if not text:
      raise InputError("The mesh is empty: write it like data=2,model=4.")
    parts = text.split(",")
    if all("=" not in p for p in parts):
      spec = parts
    else:
      out = {}
      for p in parts:
        name, sep, value = p.partition("=")
        if name in out:
          raise InputError(f"Bad mesh {shown!r}: axis {name} is given twice; give each axis once.")
        if not sep or name not in MESH_AXES:
          raise InputError(f"Bad mesh {shown!r} (axes: {', '.join(MESH_AXES)}): {_MESH_FORMS}.")
        out[name] = _mesh_size(value, shown)
      return {a: out.get(a, 1) for a in MESH_AXES}
  sizes = list(spec)
  if len(sizes) != len(MESH_AXES):
    if isinstance(shown, str):
      raise InputError(f"Bad mesh {shown!r}: {_MESH_FORMS}.")
    raise InputError(f"Bad mesh {shown!r}: give {len(MESH_AXES)} sizes ({', '.join(MESH_AXES)}), e.g. (2, 4).")
  return {a: _mesh_size(s, shown) for a, s in zip(MESH_AXES, sizes)}


_MESH_FORMS = ("write it like data=2,model=4, or model=4 (an axis left out is 1), or 2,4 (sizes in the order data, "
               "model); -1 takes the devices left over")


def _mesh_size(value: Any, spec: Any) -> int:
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = 0
  if n < 1 and n != -1:
    raise InputError(f"Bad mesh {spec!r}: every axis size must be a positive integer or -1, got {value!r}.")
  return n


def make_mesh(spec: str | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A `data` x `model` mesh over all devices (all processes' devices under `jax.distributed`).

  Args:
    spec: the shape, e.g. `"data=2,model=4"` or `(2, 4)`; one size may be -1 (the devices left over).
    devices: the devices to use (default: `jax.devices()`); the shape must use all of them.

  Returns:
    A `jax.sharding.Mesh` with `Auto` axes (shardings propagate through the program as in T5X/pjit).

  Raises:
    InputError: a malformed spec, or a shape that does not match the number of devices.
  """
  sizes = parse_mesh_shape(spec)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  known = math.prod(s for s in sizes.values() if s != -1)
  fills = [a for a, s in sizes.items() if s == -1]
  if len(fills) > 1:
    raise InputError(f"Bad mesh {spec!r}: only one axis may be -1.")
  if fills:
    if n % known:
      raise InputError(f"Mesh {spec!r}: {n} devices cannot be split into axes of {known}.")
    sizes[fills[0]] = n // known
  shown = ",".join(f"{a}={s}" for a, s in sizes.items())
  if math.prod(sizes.values()) != n:
    raise InputError(
        f"Mesh {shown} needs {math.prod(sizes.values())} devices, found {n}: {_device_summary(devices)}. Choose "
        f"sizes whose product is {n} (e.g. data=-1,model=1), run on more devices (jax.distributed for multi-host), "
        "or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting.")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def _device_summary(devices: Sequence[Any]) -> str:
  kinds = sorted({getattr(d, "device_kind", str(d)) for d in devices})
  return f"{len(devices)} x {'/'.join(kinds)} over {jax.process_count()} process(es)"


def as_auto(mesh: Mesh) -> Mesh:
  """The mesh with `Auto` axes: shardings propagate through the program rather than being part of array types."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


# ---- the partitioner -------------------------------------------------------------------------------------------

def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """A tree path as `a/b/c` (dict keys, attribute names and indices)."""
  return "/".join(_key_name(k) for k in path)


def axes_from_name(name: str, ndim: int) -> tuple[str | None, ...] | None:
  """Logical axes from a shape-suffixed name (`tokens_BxO` -> ("batch", None)); None if the name has no suffix
  that fits `ndim`."""
  m = _SHAPE_SUFFIX.search(name)
  if not m:
    return None
  letters = m.group(1).split("x")
  if len(letters) != ndim:
    return None
  return tuple(_LETTER_AXES.get(letter) for letter in letters)


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """Shardings of params, caches, loop state and batches on a mesh. Frozen and hashable: a static jit argument.

  Attributes:
    mesh: the device mesh (`data`, `model` axes; an axis it lacks counts as size 1).
    rules: logical axis -> mesh axis pairs (`RULES`).
    param_axes: parameter path pattern -> logical axes pairs (`PARAM_AXES`).
    units: logical axis -> how many units the dimension holds where that is not its size: a kernel's `heads`
      dimension is N*H wide but holds N heads, and is split over the model axis only if N is divisible
      (e.g. `(("heads", 4), ("kv_heads", 2))`; `units_of(model)` reads them off a LlamaLM).
  """

  mesh: Mesh
  rules: tuple[tuple[str, str | None], ...] = RULES
  param_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = PARAM_AXES
  units: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "mesh", as_auto(self.mesh))

  # -- specs --

  def axis_size(self, mesh_axis: str | None) -> int:
    return int(self.mesh.shape.get(mesh_axis, 1)) if mesh_axis else 1

  def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int], what: str = "") -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose last dimensions have `logical_axes` (leading extra
    dimensions are replicated). A mesh axis that cannot divide a dimension, or is already used by an earlier
    dimension, leaves it replicated."""
    rules = dict(reversed(self.rules))  # the first pair for a name wins
    units = dict(self.units)
    logical = tuple(logical_axes)[max(0, len(logical_axes) - len(shape)):]
    axes = (None,) * (len(shape) - len(logical)) + logical
    out, used = [], set()
    for name, dim in zip(axes, shape):
      mesh_axis = rules.get(name) if name else None
      if mesh_axis is None or mesh_axis not in self.mesh.shape or mesh_axis in used:
        out.append(None)
        continue
      size = self.axis_size(mesh_axis)
      n = units.get(name, dim)
      if dim % size or n % size:
        # Rows: one line for all of the batch's arrays (prompts, caches, loop state), not one per array.
        whose = "the batch's arrays" if name == "batch" else what or "an array"
        _note_fallback(f"{whose}: {name} ({n}) is not divisible by {mesh_axis}={size}; replicated")
        out.append(None)
        continue
      out.append(mesh_axis)
      used.add(mesh_axis)
    while out and out[-1] is None:
      out.pop()
    return PartitionSpec(*out)

  def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int], what: str = "") -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes, shape, what))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def param_logical_axes(self, path: str) -> tuple[str | None, ...]:
    """The logical axes of a parameter by its path (`()`, i.e. replicated, when no pattern matches)."""
    for pattern, axes in self.param_axes:
      if re.search(pattern, path):
        return axes
    return ()

  # -- trees --

  def param_shardings(self, params: Any) -> Any:
    """A NamedSharding per leaf of a parameter tree (or an optimizer state, or a train state). Works on arrays,
    `ShapeDtypeStruct`s and tracers."""
    def one(path, x):
      p = path_str(path)
      return self.sharding(self.param_logical_axes(p), np.shape(x), p)
    return jax.tree_util.tree_map_with_path(one, params)

  def cache_shardings(self, cache: Any) -> Any:
    """Shardings of a `KVCache` (tuples of per-layer arrays or stacked `[L, ...]` arrays), and of an encoder-decoder's
    cross-attention cache (same layouts, source positions for slots) when it has one."""
    k_axes = ("batch", "kv_heads", "head_dim", "length")
    v_axes = ("batch", "kv_heads", "length", "head_dim")
    out = cache.replace(
        k=jax.tree.map(lambda x: self.sharding(k_axes, x.shape, "cache keys"), cache.k),
        v=jax.tree.map(lambda x: self.sharding(v_axes, x.shape, "cache values"), cache.v),
        lengths=self.sharding(("batch",), cache.lengths.shape, "cache lengths"))
    if hasattr(cache, "cross_k"):
      out = out.replace(
          cross_k=jax.tree.map(lambda x: self.sharding(k_axes, x.shape, "cross keys"), cache.cross_k),
          cross_v=jax.tree.map(lambda x: self.sharding(v_axes, x.shape, "cross values"), cache.cross_v),
          enc_valid_BxP=self.sharding(("batch", None), cache.enc_valid_BxP.shape, "encoder mask"))
    return out

  def batch_shardings(self, batch: Any) -> Any:
    """Training batches: dimension 0 of every array is the batch (split over `data`)."""
    return jax.tree.map(lambda x: self.sharding(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x), "batch")
                        if np.ndim(x) else self.replicated, batch)

  def state_shardings(self, tree: Any) -> Any:
    """Shardings for decode-loop state: KV caches by `cache_shardings`, arrays whose name ends in a shape suffix
    by its letters (B -> batch), and None (left to propagation) for the rest."""
    from jaxspec.models.cache import KVCache

    is_cache = lambda x: isinstance(x, KVCache)

    def one(path, x):
      if is_cache(x):
        return self.cache_shardings(x)
      axes = axes_from_name(_key_name(path[-1]), np.ndim(x)) if path else None
      return self.sharding(axes, np.shape(x), path_str(path)) if axes else None

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_cache)

  # -- applying shardings --

  def constrain(self, tree: Any, shardings: Any) -> Any:
    """`with_sharding_constraint` leaf by leaf; a None sharding leaves its leaf to propagation. Jittable (inside
    jit)."""
    return _map_with_shardings(lambda x, s: jax.lax.with_sharding_constraint(x, s), tree, shardings)

  def constrain_state(self, tree: Any) -> Any:
    """Constrains decode-loop state (caches, batch arrays) to `state_shardings`. Jittable."""
    return self.constrain(tree, self.state_shardings(tree))

  def shard_params(self, params: Any) -> Any:
    """Parameters placed on the mesh by the rules (outside jit)."""
    return place(params, self.param_shardings(params))

  def shard_batch(self, batch: Any) -> Any:
    """A training batch placed on the mesh, split over `data` (outside jit)."""
    return place(batch, self.batch_shardings(batch))


def _map_with_shardings(fn, tree: Any, shardings: Any) -> Any:
  """`fn(leaf, sharding)` for every leaf of `tree` whose sharding (same structure, possibly None) is not None."""
  flat_x, treedef = jax.tree.flatten(tree)
  flat_s = treedef.flatten_up_to(shardings)
  return treedef.unflatten([x if s is None else fn(x, s) for x, s in zip(flat_x, flat_s)])


_FALLBACKS: set[str] = set()


def _note_fallback(message: str) -> None:
  """Logs a fallback once per kind of array: the same weight of every layer (`layers_0/...`, `layers_1/...`) is one
  line, `layers_*/...`, and so is the same weight of a model inside another's params (a draft's `base/layers_0/...`
  beside its target's)."""
  message = re.sub(r"(?<![A-Za-z0-9])layers_\d+(?=/)", "layers_*", message)
  message = re.sub(r"^[^:]*?/(?=layers_\*/)", "", message)
  if message not in _FALLBACKS:
    _FALLBACKS.add(message)
    logger.info("sharding: %s", message)


def units_of(model: Any) -> tuple[tuple[str, int], ...]:
  """How many heads / kv heads a model's kernels hold (read off `model.cfg` when it is a LlamaLM-like config)."""
  cfg = getattr(model, "cfg", None)
  out = []
  for name, attr in (("heads", "n_heads"), ("kv_heads", "n_kv_heads")):
    if isinstance(getattr(cfg, attr, None), int):
      out.append((name, getattr(cfg, attr)))
  if getattr(model, "is_encoder_decoder", False) and isinstance(getattr(cfg, "n_heads", None), int):
    out.append(("kv_heads", cfg.n_heads))  # T5 attention has as many key/value heads as query heads
  return tuple(out)


def partitioner(mesh: Mesh | Partitioner | str | Sequence[int] | None, model: Any = None) -> Partitioner | None:
  """A `Partitioner` from a mesh, a mesh spec (`"data=2,model=4"`) or a partitioner; None stays None. With
  `model`, kernels are split by whole heads (`units_of(model)`)."""
  if mesh is None or isinstance(mesh, Partitioner):
    return mesh
  if not isinstance(mesh, Mesh):
    mesh = make_mesh(mesh)
  return Partitioner(mesh, units=units_of(model) if model is not None else ())


# ---- host <-> mesh ----------------------------------------------------------------------------------------------

def place(tree: Any, shardings: Any) -> Any:
  """Puts a pytree of host or device arrays onto the mesh with the given shardings (None: left where it is).

  On one process this is `jax.device_put`. Under `jax.distributed`, where a sharding spans devices of other
  processes, every process must pass the same values (the same checkpoint, the same batch): each builds its own
  shards from them.
  """
  def one(x, s):
    if getattr(x, "sharding", None) == s:
      return x
    if s.is_fully_addressable:
      return jax.device_put(x, s)
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return _map_with_shardings(one, tree, shardings)


def fetch(tree: Any) -> Any:
  """Device arrays to host numpy, gathering shards held by other processes when there are any."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if all(x.is_fully_addressable or x.is_fully_replicated for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def from_first_process(obj: Any) -> Any:
  """`obj` as process 0 has it, on every process of a multi-host run (a JSON value: what process 0 read from a file
  that the others may not see, or may see changed). The value comes back through JSON in a one-process run too
  (tuples as lists, dict keys as strings), so both behave alike. Every process must call it."""
  text = json.dumps(obj)  # on every process, before any collective: a value JSON cannot hold fails everywhere
  if jax.process_count() == 1:
    return json.loads(text)
  from jax.experimental import multihost_utils
  data = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buf = np.zeros(size, np.uint8)
  if jax.process_index() == 0:
    buf[:] = data
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes().decode())


def same_everywhere(obj: Any) -> bool:
  """Whether every process of a multi-host run holds the same JSON value `obj` (True in a one-process run); the same
  answer on every process, so all of them can fail together. Every process must call it."""
  digest = np.frombuffer(hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()[:8], np.int32)
  gathered = each_process(digest)
  return bool((gathered == gathered[0]).all())


def each_process(value: Any) -> np.ndarray:
  """Every process's `value` (a small integer array or scalar), stacked in process order: `[value]` in a
  one-process run. Every process must call it."""
  value = np.asarray(value, np.int32)
  if jax.process_count() == 1:
    return value[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(value))


def initialize_distributed(timeout_s: int | None = None) -> None:
  """`jax.distributed.initialize()`; once per process, before anything touches a device. Every process then sees all
  processes' devices in `jax.devices()`.

  JAX finds the other processes by itself on the clusters it knows (Cloud TPU VMs, SLURM, Open MPI, Kubernetes
  jobs). Anywhere else (GPU machines of your own, several processes on one machine) set on every process
  `JAX_COORDINATOR_ADDRESS` (host:port of process 0, which JAX reads itself), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (0 .. N-1). `timeout_s`: how long to wait for every process to join (None: JAX's default, 300 s,
  after which JAX ends the process)."""
  kwargs = {} if timeout_s is None else {"initialization_timeout": int(timeout_s)}
  for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if os.environ.get(var):
      try:
        kwargs[key] = int(os.environ[var])
      except ValueError:
        raise InputError(f"{var}={os.environ[var]!r} is not a whole number.") from None
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address and not re.fullmatch(r".+:[0-9]{1,5}", address):
    raise InputError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port: give process 0's host and a free port "
                     "on it, e.g. 10.0.0.2:1234.")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 - JAX raises RuntimeError/ValueError depending on the cluster detection
    raise InputError(f"jax.distributed.initialize() failed ({e}); --distributed needs a multi-host environment JAX "
                     "detects (e.g. every worker of a Cloud TPU VM slice, started with --worker=all), or "
                     "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set on every process.") from None
  logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())


def describe(tree: Any, shardings: Any) -> list[str]:
  """`path shape -> spec` lines, for logs and debugging."""
  flat_x, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat_s = treedef.flatten_up_to(shardings)
  return [f"{path_str(p)} {tuple(np.shape(x))} -> {getattr(s, 'spec', s)}" for (p, x), s in zip(flat_x, flat_s)]


def mesh_info(mesh: Mesh | None) -> Mapping[str, int] | None:
  """`{"data": 2, "model": 4}` for a mesh, None for none (for results files)."""
  return None if mesh is None else {a: int(s) for a, s in mesh.shape.items()}
