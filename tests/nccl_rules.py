"""NCCL's rules, checked on CPU: a recorder for ``torch.distributed`` calls inside each rank.

The test suite runs on CPU with gloo, which forgives what NCCL does not. This helper records,
inside each spawned rank, every point-to-point and collective call and then checks the calls of
all ranks against three rules that NCCL imposes:

1. **Point-to-point order.** NCCL runs all sends and receives between two ranks in issue order
   on one stream, and a send completes only together with its receive. So, outside a
   ``dist.batch_isend_irecv`` group, the i-th op that rank a posts towards rank b must meet
   the i-th op b posts towards a: a send against a receive, of the same shape and dtype.
   Inside a group the order is free: the group is posted as a whole. The check simulates the
   two ranks' streams: each rank posts its next *slot* (one single op, or all its ops of one
   group towards that peer); the k-th send a -> b completes with the k-th receive on b from a
   once both are posted; a slot is done when all its ops are. When neither rank can move, the
   pair deadlocks on NCCL and the posted ops are reported. (gloo's ``isend`` never blocks, so
   the same program finishes on CPU: that is why the suite needs this rule.) The rule is per
   pair of ranks; dependencies that run through a third rank are not modelled.
2. **Tensors on the rank's device.** Under NCCL, every tensor handed to a collective or a
   point-to-point op must be on ``rank_device()`` (``cuda:LOCAL_RANK``). Checked literally
   against ``rank_device()`` (that is the real check on a GPU). On CPU the rank's device *is*
   the CPU, so a literal check cannot fail; with ``simulate_nccl=True`` (the default) the
   recorder therefore also tracks, with a ``TorchFunctionMode``, which tensors would live in
   host memory on a GPU machine: those made by a factory call without a ``device`` (``torch.tensor``,
   ``torch.zeros``, ``torch.randint``...), by ``.cpu()``, tensors passed to :meth:`NcclRules.mark_host`
   (e.g. the batch a worker received from its parent), and every result computed only from such
   tensors. A ``.to(device)`` / ``.to(rank_device())`` (or ``param.data = ...``, as
   ``module.to`` does) yields a tensor on the rank's device (on CPU, ``.to`` of a host tensor
   returns a copy, as it would on a GPU). Handing a host tensor to a collective is reported.
   On CPU an explicit ``device="cpu"`` is indistinguishable from ``device=rank_device()``, so
   both count as the rank's device; write ``.cpu()`` for host copies.
3. **Collective order.** Every member of a process group calls the same collectives in the
   same order, with the same shapes and dtypes (ranks that disagree hang on NCCL, or reduce
   mismatched buffers).

What is seen: calls made through the ``torch.distributed`` namespace (``dist.all_reduce``,
``dist.batch_isend_irecv``, ... as course_lib, ``torch.distributed.pipelining`` and FSDP2's
collectives call them). Not seen: C++-side collectives (DDP's reducer, its parameter broadcast)
and DTensor's functional collectives.

Use inside a rank::

    with NcclRules() as rules:
        ...  # the code under test
    rules.check()          # collective: every rank must call it; raises on a violation

or ``spawn(run_checked, world_size, worker_fn, *args)``, which does both around ``worker_fn``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from course_lib.distributed.launch import rank_device

P2P_NAMES = ("send", "recv", "isend", "irecv")
COLLECTIVE_NAMES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
    "all_to_all_single", "gather", "scatter", "barrier", "monitored_barrier", "all_gather_object",
    "broadcast_object_list", "gather_object", "scatter_object_list", "all_reduce_coalesced",
)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
_HOST = "_nccl_rules_host"  # attribute marking a tensor that would live in host memory on a GPU
_DATA = torch._C.TensorBase.__dict__["data"]  # ``param.data = t`` reaches the mode as _DATA.__set__


class NcclRuleViolation(AssertionError):
    """The recorded calls break one of NCCL's rules (the message lists each violation)."""


# ------------------------------------------------------------------ the checks (pure functions)


@dataclass(frozen=True)
class P2PRecord:
    """One send or receive: ``kind`` ("send"/"recv"), global ``peer``, ``group`` (a batch id or None)."""

    kind: str
    peer: int
    shape: tuple[int, ...]
    dtype: str
    group: int | None = None

    def describe(self) -> str:
        where = f"in batch_isend_irecv group {self.group}" if self.group is not None else "issued alone"
        return f"{self.kind} {tuple(self.shape)} {self.dtype} ({where})"


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call: its name, its group, the shapes/dtypes of its tensors and reduce op."""

    name: str
    group: tuple[str, tuple[int, ...]]
    signature: tuple[Any, ...]

    def describe(self) -> str:
        return f"{self.name}{self.signature}"


def _slots(log: list[P2PRecord], peer: int) -> list[list[tuple[int, P2PRecord]]]:
    """This rank's ops towards ``peer`` as NCCL posts them: one slot per single op or per group."""
    slots: list[list[tuple[int, P2PRecord]]] = []
    i = 0
    for rec in log:
        if rec.peer != peer:
            continue
        if rec.group is not None and slots and slots[-1][0][1].group == rec.group:
            slots[-1].append((i, rec))
        else:
            slots.append([(i, rec)])
        i += 1
    return slots


def _pair_violations(a: int, log_a: list[P2PRecord], b: int, log_b: list[P2PRecord]) -> list[str]:
    slots = {a: _slots(log_a, b), b: _slots(log_b, a)}
    out: list[str] = []
    # match ids: the k-th send x -> y pairs with the k-th receive on y from x
    match: dict[int, list[list[tuple[str, int]]]] = {}
    by_id: dict[tuple[str, int], dict[int, tuple[int, P2PRecord]]] = {}
    for me, other in ((a, b), (b, a)):
        count = {"send": 0, "recv": 0}
        match[me] = []
        for slot in slots[me]:
            ids = []
            for i, rec in slot:
                direction = f"{me}->{other}" if rec.kind == "send" else f"{other}->{me}"
                key = (direction, count[rec.kind])
                count[rec.kind] += 1
                ids.append(key)
                by_id.setdefault(key, {})[me] = (i, rec)
            match[me].append(ids)
    for _key, ends in sorted(by_id.items()):
        if len(ends) == 1:
            (who, (i, rec)), = ends.items()
            out.append(f"ranks {a} and {b}: rank {who}'s op #{i} towards rank {a + b - who} ({rec.describe()}) "
                       f"has no matching {'recv' if rec.kind == 'send' else 'send'} on rank {a + b - who}: it never completes")
            continue
        (ia, ra), (ib, rb) = ends[a], ends[b]
        if (ra.shape, ra.dtype) != (rb.shape, rb.dtype):
            out.append(f"ranks {a} and {b}: rank {a}'s op #{ia} ({ra.describe()}) meets rank {b}'s op #{ib} "
                       f"({rb.describe()}): shapes or dtypes differ")
    if out:
        return out
    # simulate the two streams
    pos = {a: 0, b: 0}
    left = {r: [set(ids) for ids in match[r]] for r in (a, b)}
    while pos[a] < len(left[a]) or pos[b] < len(left[b]):
        posted = {r: left[r][pos[r]] if pos[r] < len(left[r]) else set() for r in (a, b)}
        ready = posted[a] & posted[b]
        if not ready:
            def show(r: int) -> str:
                if pos[r] >= len(slots[r]):
                    return f"rank {r} has nothing left to post"
                waiting = [f"op #{i} (0-based) towards rank {a + b - r}: {rec.describe()}" for (i, rec), key in zip(slots[r][pos[r]], match[r][pos[r]], strict=True)
                           if key in left[r][pos[r]]]
                return f"rank {r} waits in " + ", ".join(waiting)
            out.append(f"NCCL deadlock between ranks {a} and {b}: {show(a)}; {show(b)}. Each op's partner is "
                       "posted only after an op that cannot finish first (NCCL processes a pair's sends and "
                       "receives in issue order): post them together with dist.batch_isend_irecv")
            return out
        for r in (a, b):
            posted[r] -= ready
            while pos[r] < len(left[r]) and not left[r][pos[r]]:
                pos[r] += 1
    return out


def p2p_violations(logs: list[list[P2PRecord]]) -> list[str]:
    """Rule 1 over every pair of ranks; ``logs[r]`` is rank ``r``'s p2p ops in issue order."""
    out: list[str] = []
    for a in range(len(logs)):
        for b in range(a + 1, len(logs)):
            out += _pair_violations(a, logs[a], b, logs[b])
    for r, log in enumerate(logs):
        out += [f"rank {r}: op towards rank {rec.peer}, which does not exist" for rec in log
                if not 0 <= rec.peer < len(logs)]
    return out


def collective_order_violations(logs: list[list[CollectiveRecord]]) -> list[str]:
    """Rule 3: within each group, every member's sequence of collectives is the same."""
    per_group: dict[tuple[str, tuple[int, ...]], dict[int, list[CollectiveRecord]]] = {}
    for r, log in enumerate(logs):
        for rec in log:
            per_group.setdefault(rec.group, {}).setdefault(r, []).append(rec)
    out = []
    for group, seqs in per_group.items():
        members = group[1]
        first = members[0]
        ref = seqs.get(first, [])
        for r in members[1:]:
            seq = seqs.get(r, [])
            for i in range(max(len(ref), len(seq))):
                x = ref[i].describe() if i < len(ref) else "nothing"
                y = seq[i].describe() if i < len(seq) else "nothing"
                if x != y:
                    out.append(f"group {list(members)}: collective #{i} is {x} on rank {first} but {y} on rank {r} "
                               "(every member must call the same collectives in the same order)")
                    break
    return out


# ------------------------------------------------------------------ host-tensor tracking


def _is_host(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and getattr(x, _HOST, False)


def _tensor_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from (t for t in x if isinstance(t, torch.Tensor))


def _mark(out: Any, host: bool, inputs: list[torch.Tensor]) -> None:
    if not host:
        return
    for t in (out if isinstance(out, (list, tuple)) else (out,)):
        if isinstance(t, torch.Tensor) and not any(t is x for x in inputs):
            setattr(t, _HOST, True)


class _HostTracking(TorchFunctionMode):
    """Marks tensors that would be in host memory on a GPU machine (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and _is_host(args[0]):
            device = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})[0]
            if device is not None:  # a move to the rank's device: a new tensor, as on a GPU
                return func(*args, **{**kwargs, "copy": True})
        if getattr(func, "__self__", None) is _DATA and func.__name__ == "__set__":
            result = func(*args, **kwargs)
            setattr(args[0], _HOST, _is_host(args[1]))
            return result
        if func is torch.Tensor.cpu and args and not _is_host(args[0]):
            out = args[0].clone()  # on a GPU, .cpu() of a device tensor is a new tensor in host memory
            setattr(out, _HOST, True)
            return out
        out = func(*args, **kwargs)
        inputs = list(_tensor_args(args, kwargs))
        if kwargs.get("device") is not None:
            return out
        _mark(out, all(_is_host(t) for t in inputs), inputs)  # no tensor inputs: a factory call
        return out


# ------------------------------------------------------------------ the recorder


@dataclass
class NcclRules:
    """Record this rank's ``torch.distributed`` calls (a context manager), then :meth:`check` them."""

    simulate_nccl: bool = True
    p2p: list[P2PRecord] = field(default_factory=list)
    collectives: list[CollectiveRecord] = field(default_factory=list)
    device_errors: list[str] = field(default_factory=list)
    _saved: dict[str, Any] = field(default_factory=dict)
    _batches: int = 0
    _mode: Any = None

    # -- set-up
    def __enter__(self) -> NcclRules:
        names = [n for n in (*P2P_NAMES, *COLLECTIVE_NAMES, "batch_isend_irecv", "P2POp") if hasattr(dist, n)]
        self._saved = {n: getattr(dist, n) for n in names}
        for n in P2P_NAMES:
            setattr(dist, n, self._p2p_wrapper(n))
        for n in COLLECTIVE_NAMES:
            if n in self._saved:
                setattr(dist, n, self._collective_wrapper(n))
        dist.batch_isend_irecv = self._batch
        dist.P2POp = self._p2p_op
        if self.simulate_nccl:
            self._mode = _HostTracking()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for n, f in self._saved.items():
            setattr(dist, n, f)

    def mark_host(self, obj: Any) -> Any:
        """Mark every tensor in ``obj`` (tensor, dict, list, tuple) as host memory; returns ``obj``."""
        if isinstance(obj, torch.Tensor):
            setattr(obj, _HOST, True)
        elif isinstance(obj, dict):
            for v in obj.values():
                self.mark_host(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.mark_host(v)
        return obj

    # -- recording
    def _check_device(self, what: str, t: torch.Tensor) -> None:
        expected = rank_device()
        if t.device != expected:
            self.device_errors.append(f"rank {dist.get_rank()}: {what} got a tensor on {t.device}, "
                                      f"not on the rank's device {expected}")
        elif self.simulate_nccl and _is_host(t):
            self.device_errors.append(
                f"rank {dist.get_rank()}: {what} got a tensor {tuple(t.shape)} {t.dtype} made in host memory "
                f"(created without device=..., or by .cpu()); under NCCL it must be on rank_device() "
                f"(cuda:LOCAL_RANK)")

    def _p2p_wrapper(self, name: str) -> Callable[..., Any]:
        original = self._saved[name]
        signature = inspect.signature(original)
        kind = "send" if "send" in name else "recv"

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group")
            peer = bound.get("dst" if kind == "send" else "src")
            group_peer = bound.get("group_dst" if kind == "send" else "group_src")
            if peer is None and group_peer is not None:
                peer = dist.get_global_rank(group or dist.group.WORLD, group_peer)
            tensor = bound["tensor"]
            self._check_device(f"dist.{name}", tensor)
            if peer is None:
                self.device_errors.append(f"rank {dist.get_rank()}: dist.{name} from any source: NCCL has no such op")
            else:
                self.p2p.append(P2PRecord(kind, int(peer), tuple(tensor.shape), str(tensor.dtype)))
            return original(*args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    def _p2p_op(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        op = {dist.isend: self._saved["isend"], dist.irecv: self._saved["irecv"]}.get(op, op)
        return self._saved["P2POp"](op, *args, **kwargs)

    def _batch(self, ops: list[Any]) -> Any:
        group = self._batches
        self._batches += 1
        for op in ops:
            kind = "send" if op.op is self._saved["isend"] else "recv"
            self._check_device("dist.batch_isend_irecv", op.tensor)
            self.p2p.append(P2PRecord(kind, int(op.peer), tuple(op.tensor.shape), str(op.tensor.dtype), group))
        return self._saved["batch_isend_irecv"](ops)

    def _collective_wrapper(self, name: str) -> Callable[..., Any]:
        original = self._saved[name]
        signature = inspect.signature(original)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group") or dist.group.WORLD
            key = (getattr(group, "group_name", ""), tuple(dist.get_process_group_ranks(group)))
            sig: list[Any] = []
            if name not in OBJECT_COLLECTIVES:
                for arg, value in bound.items():
                    if isinstance(value, torch.Tensor):
                        self._check_device(f"dist.{name}", value)
                        if name != "all_to_all_single":  # its shapes may differ by rank (splits)
                            sig.append((arg, tuple(value.shape), str(value.dtype)))
                    elif isinstance(value, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in value):
                        for t in value:
                            self._check_device(f"dist.{name}", t)
                if "op" in bound:
                    sig.append(("op", str(bound["op"])))
            if name in ("gather", "scatter", "reduce", "broadcast"):
                sig.append(("root", bound.get("dst", bound.get("src"))))
            self.collectives.append(CollectiveRecord(name, key, tuple(sig)))
            return original(*args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    # -- checking
    def violations(self) -> list[str]:
        """Every rank's records, checked; the same list on every rank (a collective: all must call it)."""
        gather = self._saved.get("all_gather_object", dist.all_gather_object)
        logs: list[Any] = [None] * dist.get_world_size()
        gather(logs, (self.p2p, self.collectives, self.device_errors))
        out = [e for _, _, errors in logs for e in errors]
        out += p2p_violations([p for p, _, _ in logs])
        out += collective_order_violations([c for _, c, _ in logs])
        return out

    def check(self) -> None:
        """Raise :class:`NcclRuleViolation` listing the violations (collective: every rank must call it)."""
        found = self.violations()
        if found:
            raise NcclRuleViolation(f"{len(found)} NCCL rule violation(s):\n" + "\n".join(found[:20]))


def run_checked(rank: int, world_size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """A :func:`~course_lib.distributed.launch.spawn` worker: ``fn(rank, world_size, *args)`` under :class:`NcclRules`.

    The arguments received from the parent are marked as host memory. Raises
    :class:`NcclRuleViolation` (on every rank) when the calls break a rule; else returns ``fn``'s result.
    """
    with NcclRules() as rules:
        rules.mark_host(args)
        result = fn(rank, world_size, *args)
    rules.check()
    return result
