"""The typed description of an experts region: what the matcher proves and the op computes.

Shape letters used across the package:
    T tokens, k experts per token (top-k), E experts, H hidden size, I expert intermediate size,
    S = T * k (token, slot) pairs.

The experts computation, for every token t and slot j with expert e = topk_ids[t, j]:

    h        = x[t] @ W_gate_up[e]^T (+ b_gate_up[e])          # [2I]
    gate, up = split(h)                                          # concat: h[:I], h[I:]; interleaved: h[0::2], h[1::2]
    a        = act(gate) * up                                    # [I]  (gpt-oss: clamped variant, see below)
    y        = a @ W_down[e]^T (+ b_down[e])                     # [H]
    out[t]  += topk_weights[t, j] * y

With scale_input=True (Llama-4) the router weight scales the expert's *input* instead:
    out[t]  += expert_e(topk_weights[t, j] * x[t])               # f(w x) != w f(x) for a gated MLP

Weight layouts:
    transposed=False (Qwen, Mixtral, DeepSeek, ...): W_gate_up [E, 2I, H], W_down [E, H, I]  (nn.Linear's [out, in])
    transposed=True  (GPT-OSS):                      W_gate_up [E, H, 2I], W_down [E, I, H]
"""

from __future__ import annotations

import dataclasses
import enum


class Activation(str, enum.Enum):
    """The gate activation of a gated (GLU-style) expert MLP."""

    SILU = "silu"  # SwiGLU: silu(gate) * up
    GELU = "gelu"  # GeGLU, erf form: gelu(gate) * up
    GELU_TANH = "gelu_tanh"  # GeGLU, tanh approximation
    RELU = "relu"  # ReGLU
    # GPT-OSS: gate, up clamped (gate <= limit, |up| <= limit), then gate * sigmoid(alpha * gate) * (up + 1).
    GPT_OSS_SWIGLU = "gpt_oss_swiglu"


class GateUpLayout(str, enum.Enum):
    """How gate and up halves sit along the 2I axis of the gate_up projection."""

    CONCAT = "concat"  # [gate_0 .. gate_{I-1}, up_0 .. up_{I-1}]
    INTERLEAVED = "interleaved"  # [gate_0, up_0, gate_1, up_1, ...]


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """Everything about an experts computation that is not a tensor.

    It travels into the op as plain schema arguments (see `op_args`), so graph dumps and the profiler
    show it and the op keeps one signature.
    """

    activation: Activation = Activation.SILU
    gate_up: GateUpLayout = GateUpLayout.CONCAT
    transposed: bool = False
    # Only read for GPT_OSS_SWIGLU; kept at GPT-OSS's values otherwise so specs compare equal.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # The router weight multiplies each expert's input rows (Llama-4), not its output rows.
    scale_input: bool = False

    def __post_init__(self):
        # Accept plain strings (as they arrive from the op schema) but store the enums.
        try:
            object.__setattr__(self, "activation", Activation(self.activation))
        except ValueError:
            raise ValueError(
                f"ExpertsSpec.activation: expected one of {[a.value for a in Activation]}, got {self.activation!r}"
            ) from None
        try:
            object.__setattr__(self, "gate_up", GateUpLayout(self.gate_up))
        except ValueError:
            raise ValueError(
                f"ExpertsSpec.gate_up: expected one of {[g.value for g in GateUpLayout]}, got {self.gate_up!r}"
            ) from None
        if not isinstance(self.transposed, bool):
            raise ValueError(f"ExpertsSpec.transposed: expected a bool, got {self.transposed!r}")
        if not isinstance(self.scale_input, bool):
            raise ValueError(f"ExpertsSpec.scale_input: expected a bool, got {self.scale_input!r}")
        if self.activation is Activation.GPT_OSS_SWIGLU and not self.swiglu_limit > 0:
            raise ValueError(f"ExpertsSpec.swiglu_limit: expected > 0, got {self.swiglu_limit}")

    def op_args(self) -> tuple[str, str, bool, float, float, bool]:
        """The spec as the trailing arguments of `torch.ops.moe_compiler.experts`."""
        return (self.activation.value, self.gate_up.value, self.transposed, float(self.swiglu_alpha), float(self.swiglu_limit), self.scale_input)

    @classmethod
    def from_op_args(cls, activation: str, gate_up: str, transposed: bool, swiglu_alpha: float, swiglu_limit: float,
                     scale_input: bool = False) -> ExpertsSpec:
        return cls(Activation(activation), GateUpLayout(gate_up), bool(transposed), swiglu_alpha, swiglu_limit, bool(scale_input))

    def intermediate(self, w_down) -> int:
        """I, read off the down weight in this spec's layout ([E, H, I], or [E, I, H] transposed)."""
        return w_down.shape[1] if self.transposed else w_down.shape[2]

    def describe(self) -> str:
        act = self.activation.value
        if self.activation is Activation.GPT_OSS_SWIGLU:
            act += f"(alpha={self.swiglu_alpha}, limit={self.swiglu_limit})"
        layout = "[E,H,2I]/[E,I,H]" if self.transposed else "[E,2I,H]/[E,H,I]"
        scaled = ", router weight scales the input" if self.scale_input else ""
        return f"{act}, gate_up={self.gate_up.value}, weights {layout}{scaled}"
