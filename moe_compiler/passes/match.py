"""The interface every recognizer returns, and why a region is left alone.

    recognize(...) -> Match | raise Reject
    match.describe()        one line for the report
    match.verify(gm, real)  the numerical check (a second line of evidence beside the structural proof)
    match.rewrite(gm)       checks everything and computes every new node's value, then returns the edit:
                            a function that only edits the graph (so a failure never leaves it half-edited)
    match.after_code(gm)    the replacement as code, for the dump

Three kinds of matches exist, each with its own form enum: the experts region (ExpertsForm), the router
feeding a fused experts call (RouterForm), the shared experts added to it (SharedForm).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable

import torch.fx as fx


class Reject(Exception):
    """A recognizer cannot prove a fact the op needs; the message is the reason shown in the log and the dump,
    naming what was expected and what the graph had."""


class NoExpertGemm(Reject):
    """The region has no expert GEMM of the routed forms (it may still be another form, e.g. Llama-4's)."""


class EagerExpertsLoop(Reject):
    """The experts are transformers' `experts_implementation="eager"` loop: graph breaks, nothing to fuse."""


class ExpertsForm(str, enum.Enum):
    GROUPED_MM = "grouped_mm"  # experts_implementation="grouped_mm" (the transformers 5.x default)
    BATCHED_MM = "batched_mm"  # experts_implementation="batched_mm"
    DENSE_BMM = "dense_bmm"  # Llama-4: every expert on every token, the input scaled by the router score
    INDEX_ADD_LOOP = "index_add_loop"  # static expert loop into an accumulator (transformers v4, hand-written)


class RouterForm(str, enum.Enum):
    SOFTMAX_TOPK = "softmax_topk"
    SIGMOID_TOPK = "sigmoid_topk"
    SOFTMAX_GROUP_TOPK = "softmax_group_topk"
    SIGMOID_GROUP_TOPK = "sigmoid_group_topk"
    SQRTSOFTPLUS_TOPK = "sqrtsoftplus_topk"  # DeepSeek-V4
    SQRTSOFTPLUS_GROUP_TOPK = "sqrtsoftplus_group_topk"
    TOPK_SOFTMAX = "topk_softmax"
    TOPK_SIGMOID = "topk_sigmoid"
    SPARSEMIXER = "sparsemixer"


class SharedForm(str, enum.Enum):
    PLAIN = "plain"  # out = routed + MLP(x)
    SIGMOID_GATED = "sigmoid_gated"  # out = routed + sigmoid(x w^T) * MLP(x)


Edit = Callable[[], fx.Node]


class Match(abc.ABC):
    """A proven source form: `form` and `spec` say what it computes; the methods check and replace it."""

    form: enum.Enum
    spec: object

    @abc.abstractmethod
    def describe(self) -> str:
        """One line: what was proven."""

    def verify(self, gm: fx.GraphModule, real: dict) -> str:
        """Run the original nodes and the replacement on fresh inputs; raise Reject if they disagree. Returns
        a one-line result. `real` maps graph inputs to the tensors the compiled graph will receive."""
        return "proven from the graph's data flow (no numerical check for this form)"

    @abc.abstractmethod
    def rewrite(self, gm: fx.GraphModule) -> Edit:
        """Check everything the edit needs and compute the new nodes' values (raising leaves the graph as it
        was); return the edit, which only changes the graph and returns the new op-call node."""

    @abc.abstractmethod
    def after_code(self, gm: fx.GraphModule) -> str:
        """The replacement as code a person would write (keyword arguments with their names)."""
