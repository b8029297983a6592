"""``throughput.py --count-ops``: the operations one training micro-step sends to the device, counted on
the CPU, so that the host's launch overhead can be weighed before a GPU run.

A step (zero_grad, forward, backward, fused AdamW step) of ``ElectraPretrainingModel`` on the kernel path
(every hot spot on its Triton kernel, packed layout, dropout as configured) runs under a
``TorchDispatchMode`` that counts each aten op and each ``electra_kernels`` custom op that reaches torch's
dispatcher, inside a ``FakeTensorMode``: tensors carry shapes and no data, so nothing is computed and the
count at ELECTRA-Large's full batch costs seconds. The count does not depend on the batch size: no op
is issued per sequence (the packed layout is built with ``nonzero_static``, the loops run over layers).

Counted: ops that touch a device tensor (a fake one here). Not counted: ops on host tensors made by the
host generators (the MLM head's sampling seed, attention's dropout seed), which stay on the CPU in a GPU
run too; compiled, attention's seed draw is traced into the encoder graphs and counted there (one per
attention call, a CPU op inside the graph). Columns:

* ``launches``: ops that run a kernel: all but views (``view``, ``expand``, ``t``, ``slice``, ``detach``,
  ... : metadata only) and allocations (``empty*``: the caching allocator, no kernel);
* ``custom``: of those, ``electra_kernels`` ops (one Triton launch each; the attention
  backward two or three);
* compiled (``train.compile=default``, captured with torch.compile here with ``aot_eager``, whose
  graphs run op by op): ``outside`` are the ops still issued one by one (objective, layout, loss heads,
  optimizer), ``in graphs`` the ops inside the captured forward and backward graphs, ``graph calls`` how
  many graphs run. Inductor fuses the ops of a graph into fewer kernels (so ``in graphs`` is an upper
  bound of its launches) and with ``train.cuda_graphs`` each graph call is one graph replay: the host
  then issues about ``outside + graph calls`` launches.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# Metadata-only ops whose schema does not mark them as views.
_METADATA = {"_unsafe_view", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops that touch a fake (device) tensor, by name, inside and outside compiled graphs."""

    def __init__(self):
        super().__init__()
        self.reset()

    @classmethod
    def is_infra_mode(cls) -> bool:
        # Dynamo runs compiled frames under "infra" modes only (FakeTensorMode is one); any other
        # dispatch mode sends every frame back to eager, and there would be no compiled step to count.
        return True

    def reset(self) -> None:
        self.by_place: dict[str, Counter] = {"outside": Counter(), "graphs": Counter()}
        self.graph_calls = 0
        self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(_is_fake(v) for v in tree_flatten((args, kwargs, out))[0]):
            self.by_place["graphs" if self.inside else "outside"][_name(func)] += 1
        return out

    def summary(self) -> dict[str, int]:
        outside, graphs = self.by_place["outside"], self.by_place["graphs"]
        everything = outside + graphs
        return {
            "dispatched": sum(everything.values()),
            "launches": _launches(everything),
            "custom": sum(n for name, n in everything.items() if name.startswith("electra_kernels.")),
            "outside": _launches(outside),
            "in_graphs": _launches(graphs),
            "graph_calls": self.graph_calls,
        }


def _name(func) -> str:
    """"namespace.op"; aten ops that launch nothing (views, metadata, allocations) prefixed "view:"."""
    name = func._schema.name.split("::")[-1]
    if func.namespace == "prim":  # prim.device, prim.layout: a tensor's metadata asked through the dispatcher
        return f"view:prim.{name}"
    if func.namespace != "aten":
        return f"{func.namespace}.{name}"
    no_kernel = bool(getattr(func, "is_view", False)) or name in _METADATA or name in _ALLOCATIONS
    return ("view:" if no_kernel else "") + name


def _launches(ops: Counter) -> int:
    return sum(n for name, n in ops.items() if not name.startswith("view:"))


def _counting_backend(counter: OpCounter):
    """aot_eager whose forward and backward graphs mark where they run (and count their calls)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(graph, example_inputs):
        def run(*args):
            counter.graph_calls += 1
            counter.inside = True
            try:
                return graph(*args)
            finally:
                counter.inside = False

        return make_boxed_func(run)  # aot_autograd's calling convention: one list of inputs

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


@contextlib.contextmanager
def _host_generators_real():
    """The seeds drawn from host generators stay real CPU tensors (as they stay on the host on a GPU)."""
    import importlib

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    attention = importlib.import_module("electra_kernels.attention")  # the module, not the function it exports

    from electra_fast.objective import ObjectiveRNG

    def real(fn):
        def wrapped(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced into a graph (attention's seed): as dynamo sees it
                return fn(*args, **kwargs)
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return wrapped

    saved = attention._draw_seed, ObjectiveRNG.next_sampling_seed
    attention._draw_seed, ObjectiveRNG.next_sampling_seed = real(saved[0]), real(saved[1])
    try:
        yield
    finally:
        attention._draw_seed, ObjectiveRNG.next_sampling_seed = saved


@contextlib.contextmanager
def _kernel_path_on_cpu():
    """TRITON_INTERPRET=1 while counting: the model then takes the kernel path on the CPU (with fake
    tensors nothing is interpreted: each custom op runs its fake implementation)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


# The step-time budget at the throughput targets of benchmarks/RESULTS.md (sequences per second per GPU).
TARGET_SEQ_PER_S = {"small": 8000, "base": 1000, "large": 350}


def count_step_ops(cfg, batch: int, seq_len: int, *, compiled: bool) -> dict[str, int]:
    """Ops of one training micro-step of ``cfg`` (kernel path) on a (batch, seq_len) packed batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from electra_fast.compile import compile_for_training
    from electra_fast.model import ElectraPretrainingModel, packed_sizes

    from _common import synthetic_batch

    inputs = synthetic_batch(cfg.model, batch, seq_len, device=torch.device("cpu"), random_lengths=True, seed=0)
    sizes = packed_sizes(inputs[1])
    counter = OpCounter()
    torch._dynamo.reset()
    with _kernel_path_on_cpu(), FakeTensorMode(allow_non_fake_inputs=True) as fake, _host_generators_real():
        model = ElectraPretrainingModel(cfg).train()
        if compiled:
            compile_for_training(model, "default", backend=_counting_backend(counter))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fake_inputs = [fake.from_tensor(t) for t in inputs]

        def step():
            optimizer.zero_grad(set_to_none=True)
            model(*fake_inputs, **sizes).loss.backward()
            optimizer.step()

        step()  # first step: compilation and optimizer state
        counter.reset()
        with counter:
            step()
    torch._dynamo.reset()
    return counter.summary()


def count_ops_rows(sizes: list[str], shapes: dict[str, tuple[int, int]], config_for) -> list[dict[str, Any]]:
    """One row per size: eager and compiled counts, and the host time per launch the target leaves."""
    rows = []
    for size in sizes:
        batch, seq_len = shapes[size]
        cfg = config_for(size, seq_len)
        eager = count_step_ops(cfg, batch, seq_len, compiled=False)
        compiled = count_step_ops(cfg, batch, seq_len, compiled=True)
        target = TARGET_SEQ_PER_S.get(size)
        budget_ms = 1e3 * batch / target if target else None
        graphs = compiled["outside"] + compiled["graph_calls"]
        rows.append({
            "size": size, "batch": batch, "seq_len": seq_len, "eager_launches": eager["launches"],
            "eager_dispatched": eager["dispatched"], "custom_ops": eager["custom"],
            "compiled_outside": compiled["outside"], "compiled_in_graphs": compiled["in_graphs"],
            "graph_calls": compiled["graph_calls"], "cuda_graphs_launches": graphs,
            "target_seq_per_s": target, "step_budget_ms": budget_ms,
            "eager_us_per_launch": 1e3 * budget_ms / eager["launches"] if budget_ms else None,
            "cuda_graphs_us_per_launch": 1e3 * budget_ms / graphs if budget_ms else None,
        })
    return rows


def print_count_ops(rows: list[dict[str, Any]]) -> None:
    from _common import print_table

    def us(value):
        return f"{value:.1f}" if value else "-"

    print_table(
        ["size", "B x S", "eager launches", "of them custom", "compiled: outside", "in graphs", "graph calls",
         "with CUDA graphs", "step budget ms", "us/launch eager", "us/launch CUDA graphs"],
        [[r["size"], f"{r['batch']}x{r['seq_len']}", r["eager_launches"], r["custom_ops"], r["compiled_outside"],
          r["compiled_in_graphs"], r["graph_calls"], r["cuda_graphs_launches"],
          f"{r['step_budget_ms']:.1f}" if r["step_budget_ms"] else "-", us(r["eager_us_per_launch"]),
          us(r["cuda_graphs_us_per_launch"])] for r in rows],
        "Device operations per training micro-step (kernel path, packed; counted on the CPU with fake tensors)")
