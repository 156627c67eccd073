"""The typed descriptions the matcher proves and the ops compute: data only, no torch ops.

Shape letters used across the package:
    T tokens, k experts per token (top-k), E experts, H hidden size, I expert intermediate size,
    S = T * k (token, slot) pairs, Is the shared experts' intermediate size.

ExpertsSpec - the routed experts. For every token t and slot j with expert e = topk_ids[t, j]:

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

RouterSpec - the router: logits [T, E] -> (weights [T, k] fp32 or weights_dtype, ids [T, k]); forms on the class.

QuantizedExpertsSpec - an ExpertsSpec over block-scaled quantized weights (WeightFormat): same math, the
weights dequantized as q * scale per (scale_block_n x scale_block_k) block.

SharedMLP - the block's shared experts, a dense gated MLP every token passes, added to the routed output:
    out = routed + s * down(act(x gate^T) * (x up^T)),   s = sigmoid(x expert_gate^T) or 1

The specs travel into the ops as keyword-only schema arguments (ops/signature.py builds the schemas from
these dataclasses' fields), so graph dumps and the profiler show them and each op keeps one signature.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class Activation(str, enum.Enum):
    """The gate activation of a gated (GLU-style) expert MLP."""

    SILU = "silu"  # SwiGLU: silu(gate) * up
    GELU = "gelu"  # GeGLU, erf form: gelu(gate) * up
    GELU_TANH = "gelu_tanh"  # GeGLU, tanh approximation
    RELU = "relu"  # ReGLU
    # GPT-OSS: gate, up clamped (gate <= limit, |up| <= limit), then gate * sigmoid(alpha * gate) * (up + 1).
    GPT_OSS_SWIGLU = "gpt_oss_swiglu"
    # DeepSeek-V4, Hunyuan-V4: the same clamps, then plain SwiGLU: silu(gate) * up.
    SILU_CLAMPED = "silu_clamped"

    @property
    def clamped(self) -> bool:
        """Reads swiglu_limit (and GPT-OSS swiglu_alpha)."""
        return self in (Activation.GPT_OSS_SWIGLU, Activation.SILU_CLAMPED)


class GateUpLayout(str, enum.Enum):
    """How gate and up halves sit along the 2I axis of the gate_up projection."""

    CONCAT = "concat"  # [gate_0 .. gate_{I-1}, up_0 .. up_{I-1}]
    INTERLEAVED = "interleaved"  # [gate_0, up_0, gate_1, up_1, ...]


def _enum_field(obj, name: str, enum_cls) -> None:
    """Store field `name` as a member of enum_cls (plain strings arrive from op schemas)."""
    try:
        object.__setattr__(obj, name, enum_cls(getattr(obj, name)))
    except ValueError:
        raise ValueError(
            f"{type(obj).__name__}.{name}: expected one of {[m.value for m in enum_cls]}, got {getattr(obj, name)!r}"
        ) from None


def _bool_field(obj, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise ValueError(f"{type(obj).__name__}.{name}: expected a bool, got {getattr(obj, name)!r}")


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """Everything about an experts computation that is not a tensor (the experts op's keyword arguments)."""

    activation: Activation = Activation.SILU
    gate_up: GateUpLayout = GateUpLayout.CONCAT
    transposed: bool = False
    # swiglu_limit read by the clamped activations, swiglu_alpha by GPT_OSS_SWIGLU; kept at GPT-OSS's values
    # otherwise so specs compare equal.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # The router weight multiplies each expert's input rows (Llama-4), not its output rows.
    scale_input: bool = False

    def __post_init__(self):
        _enum_field(self, "activation", Activation)
        _enum_field(self, "gate_up", GateUpLayout)
        _bool_field(self, "transposed")
        _bool_field(self, "scale_input")
        if self.activation.clamped and not self.swiglu_limit > 0:
            raise ValueError(f"ExpertsSpec.swiglu_limit: expected > 0, got {self.swiglu_limit}")

    def op_kwargs(self) -> dict:
        """The spec as the experts ops' keyword arguments, as a person would write the call: the layout
        always, the clamp constants only for the activation that reads them, scale_input only when set."""
        kwargs = {"activation": self.activation.value, "gate_up": self.gate_up.value, "transposed": self.transposed}
        if self.activation is Activation.GPT_OSS_SWIGLU:
            kwargs.update(swiglu_alpha=float(self.swiglu_alpha), swiglu_limit=float(self.swiglu_limit))
        elif self.activation is Activation.SILU_CLAMPED:
            kwargs.update(swiglu_limit=float(self.swiglu_limit))
        if self.scale_input:
            kwargs["scale_input"] = True
        return kwargs

    def intermediate(self, w_down) -> int:
        """I, read off the down weight in this spec's layout ([E, H, I], or [E, I, H] transposed)."""
        return w_down.shape[1] if self.transposed else w_down.shape[2]

    def describe(self) -> str:
        act = self.activation.value
        if self.activation is Activation.GPT_OSS_SWIGLU:
            act += f"(alpha={self.swiglu_alpha}, limit={self.swiglu_limit})"
        elif self.activation is Activation.SILU_CLAMPED:
            act += f"(limit={self.swiglu_limit})"
        layout = "[E,H,2I]/[E,I,H]" if self.transposed else "[E,2I,H]/[E,H,I]"
        scaled = ", router weight scales the input" if self.scale_input else ""
        return f"{act}, gate_up={self.gate_up.value}, weights {layout}{scaled}"


class WeightFormat(str, enum.Enum):
    """How quantized expert weights are stored (QuantizedExpertsSpec). Both dequantize as
    W[e, n, k] = q[e, n, k] * scale[e, n // scale_block_n, k // scale_block_k] in fp32."""

    # float8_e4m3fn [E, N, K]; fp32 or float8_e8m0fnu scales [E, ceil(N/bn), ceil(K/bk)] (transformers'
    # finegrained FP8: DeepSeek-V3 / Kimi-K2 / Qwen3 FP8 releases, 128 x 128 blocks).
    FP8_E4M3 = "fp8_e4m3"
    # int32 [E, N, K/8], 8 signed 4-bit values per word along K (value k at bits 4 (k % 8), stored + 8); scales
    # [E, ceil(N/bn), ceil(K/bk)] (compressed-tensors pack-quantized, symmetric: Kimi-K2-Thinking, bn=1, bk=32).
    INT4_PACKED = "int4_packed"


def _scale_fields(obj) -> None:
    """weight_format, scale_block_n, scale_block_k of a quantized spec: an enum member and two positive ints."""
    _enum_field(obj, "weight_format", WeightFormat)
    for name in ("scale_block_n", "scale_block_k"):
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name}: expected a positive int, got {value!r}")


def _scale_kwargs(obj) -> dict:
    return {"weight_format": obj.weight_format.value, "scale_block_n": obj.scale_block_n,
            "scale_block_k": obj.scale_block_k}


@dataclasses.dataclass(frozen=True)
class QuantizedExpertsSpec(ExpertsSpec):
    """An ExpertsSpec whose weights are block-scaled quantized tensors (the experts_quantized op's keyword
    arguments): the math is ExpertsSpec's on the dequantized weights; gate/up concatenated, [out, in] layout."""

    weight_format: WeightFormat = WeightFormat.FP8_E4M3
    scale_block_n: int = 128  # output rows per scale
    scale_block_k: int = 128  # input columns per scale

    def __post_init__(self):
        super().__post_init__()
        _scale_fields(self)
        if self.weight_format is WeightFormat.INT4_PACKED and self.scale_block_k % 8:
            raise ValueError(
                f"QuantizedExpertsSpec: INT4 scale groups must span whole int32 words (8 values along K), got "
                f"scale_block_k={self.scale_block_k}; compressed-tensors group sizes (32, 64, 128) qualify")
        if self.transposed or self.gate_up is not GateUpLayout.CONCAT or self.scale_input:
            raise ValueError(
                "QuantizedExpertsSpec: quantized experts are read as [E, 2I, H] / [E, H, I] with gate and up "
                f"concatenated and the router weight on the output; got transposed={self.transposed}, "
                f"gate_up={self.gate_up.value}, scale_input={self.scale_input}"
            )

    def op_kwargs(self) -> dict:
        return {**super().op_kwargs(), **_scale_kwargs(self)}

    def experts(self) -> ExpertsSpec:
        """The same math on dequantized weights."""
        return ExpertsSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ExpertsSpec)})

    def describe(self) -> str:
        return (f"{super().describe()}, {self.weight_format.value} weights with "
                f"{self.scale_block_n}x{self.scale_block_k} block scales")


@dataclasses.dataclass(frozen=True)
class QuantizedLinearSpec:
    """A block-scaled quantized nn.Linear weight [N, K] (the linear_quantized op's keyword arguments):
    y = x @ W^T (+ bias), W[n, k] = q[n, k] * scale[n // scale_block_n, k // scale_block_k]."""

    weight_format: WeightFormat = WeightFormat.FP8_E4M3
    scale_block_n: int = 128
    scale_block_k: int = 128

    def __post_init__(self):
        _scale_fields(self)

    def op_kwargs(self) -> dict:
        return _scale_kwargs(self)


class Scoring(str, enum.Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    SQRTSOFTPLUS = "sqrtsoftplus"  # sqrt(softplus(x)), softplus with beta 1 and threshold 20 (DeepSeek-V4)

    @property
    def code(self) -> int:
        """The kernels' constexpr for it (triton_route.py)."""
        return list(Scoring).index(self)


class RouteOrder(str, enum.Enum):
    SCORE_THEN_TOPK = "score_then_topk"  # scores over all E experts, then top-k
    TOPK_THEN_SCORE = "topk_then_score"  # top-k of the logits, then softmax over those k
    SPARSEMIXER = "sparsemixer"  # PhiMoE: k rounds of argmax, each weighted by a softmax over its near-ties


class GroupScore(str, enum.Enum):
    """How a group of experts is scored in group-limited routing."""

    TOP2_SUM = "top2_sum"  # the sum of its best two choice scores (DeepSeek-V3)
    MAX = "max"  # its best choice score (DeepSeek-V2)


class WeightsDtype(str, enum.Enum):
    """The dtype the route op stores its top-k weights in: computed in fp32, rounded once to it on store (what the
    router's own `.to(hidden.dtype)` after its fp32 math does). Also the dtype a router computes in
    (RouterSpec.score_dtype)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def code(self) -> int:
        """The kernels' constexpr for rounding to it (triton_route.py): 0 none (fp32), 1 bf16, 2 fp16."""
        return list(WeightsDtype).index(self)

    @property
    def torch(self):
        import torch  # (spec.py itself does not need torch)

        return getattr(torch, self.value)


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """A transformers 5.x router (the route op's keyword arguments). Forms, each the op sequence of the
    named router:

        softmax -> top-k [-> renormalize]        Qwen2/Qwen3-MoE, Mixtral, OLMoE (Qwen3MoeTopKRouter ...)
        top-k on logits -> softmax over the k    GPT-OSS-style (router bias folded into the logits by the caller)
        top-k on logits -> sigmoid of each       Llama-4
        top-k on logits + bias -> sigmoid of each picked logit [-> renormalize]   Kolibri-1
        sigmoid (+ correction bias for choice) -> group-limited top-k -> gather unbiased scores [-> renormalize]
                                                 DeepSeek-V3 / Kimi-K2 / GLM4-MoE (DeepseekV3TopkRouter)
        sqrt(softplus) (+ correction bias) -> top-k -> gather [-> renormalize]   DeepSeek-V4 (DeepseekV4TopKRouter)
        x routed_scaling_factor at the end.
        sparse mixer (eval): k rounds; round r takes the best expert not taken yet (m_r, i_r) and weighs it by a
                             softmax over the untaken experts within 2 * jitter_eps of m_r, relative to
                             max(|x|, m_r)                 PhiMoE (sparsemixer, modeling_phimoe.py, training=False)

    Group-limited selection: experts split into n_group groups scored by `group_score`; only the best
    topk_group groups stay; the others' choice scores become `masked_score` (-inf in transformers 5.23).

    score_dtype: the dtype the router computes in. fp32 (the routers that upcast their logits): no rounding but
    the weights' store. bf16 / fp16 (a router whose logits stay in the model's dtype: DeepSeek-V4, Mistral-4):
    every op's result is rounded to it as eager rounds it - the scores (each elementwise op), the group scores,
    the choice (in choice_dtype: fp32 once an fp32 correction bias is added), the top-k sum, the quotient, the
    scaled weight - so the selection is made on eager's very values.
    """

    top_k: int
    scoring: Scoring = Scoring.SOFTMAX
    order: RouteOrder = RouteOrder.SCORE_THEN_TOPK
    norm_topk_prob: bool = False
    # Renormalization: w / (sum of the k + renorm_eps). DeepSeek-V3 adds 1e-20; MiniMax-M2, Laguna and Step-3.7
    # divide by the bare sum (0.0). A softmax top-k sum is >= k / E, so either value gives it the same result.
    renorm_eps: float = 1e-20
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = GroupScore.TOP2_SUM
    masked_score: float = -math.inf
    jitter_eps: float = 0.0  # sparse mixer: experts within 2 * jitter_eps (relative) of a round's best share it
    # The weights' stored dtype: a router whose fp32 weights the block casts (to the hidden's dtype) gets the cast
    # in the route kernel's store instead of a launch of its own.
    weights_dtype: WeightsDtype = WeightsDtype.FLOAT32
    score_dtype: WeightsDtype = WeightsDtype.FLOAT32  # see above: the dtype each of the router's ops rounds to

    def __post_init__(self):
        _enum_field(self, "scoring", Scoring)
        _enum_field(self, "weights_dtype", WeightsDtype)
        _enum_field(self, "score_dtype", WeightsDtype)
        _enum_field(self, "order", RouteOrder)
        _enum_field(self, "group_score", GroupScore)
        if self.order is not RouteOrder.SCORE_THEN_TOPK and (
            self.scoring is Scoring.SQRTSOFTPLUS or self.score_dtype is not WeightsDtype.FLOAT32
        ):
            raise ValueError(
                f"RouterSpec: {self.order.value} is defined with softmax / sigmoid scores in fp32, got "
                f"{self.scoring.value} in {self.score_dtype.value}"
            )
        if self.top_k < 1:
            raise ValueError(f"RouterSpec.top_k: expected >= 1, got {self.top_k}")
        if self.order is RouteOrder.TOPK_THEN_SCORE and (
            self.n_group != 1
            or (self.scoring is not Scoring.SIGMOID and (self.norm_topk_prob or self.routed_scaling_factor != 1.0))
        ):
            raise ValueError("RouterSpec.order: topk_then_score is defined without groups, and renormalization or "
                             "scaling only after a sigmoid")
        if self.order is RouteOrder.SPARSEMIXER:
            if (
                self.scoring is not Scoring.SOFTMAX
                or self.n_group != 1
                or self.norm_topk_prob
                or self.routed_scaling_factor != 1.0
            ):
                raise ValueError(
                    "RouterSpec.order: sparsemixer is defined with softmax scoring, without groups, "
                    "renormalization or scaling"
                )
            if not self.jitter_eps >= 0.0:
                raise ValueError(f"RouterSpec.jitter_eps: expected >= 0, got {self.jitter_eps}")
        elif self.jitter_eps != 0.0:
            raise ValueError(
                f"RouterSpec.jitter_eps: only the sparsemixer order has one, got {self.jitter_eps} with "
                f"{self.order.value}"
            )
        if not (math.isfinite(self.renorm_eps) and self.renorm_eps >= 0.0):
            raise ValueError(f"RouterSpec.renorm_eps: expected a finite value >= 0, got {self.renorm_eps}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"RouterSpec.topk_group: expected 1 <= topk_group <= n_group={self.n_group}, got {self.topk_group}"
            )

    def choice_dtype(self, bias_dtype) -> WeightsDtype:
        """The dtype the top-k chooses in, given the correction bias's torch dtype (None: no bias), as torch's type
        promotion makes it: without a bias the scores' own; scores + bias the promotion of the two - an fp32 bias
        (transformers 5.24 on keeps DeepSeek's in fp32) makes it fp32, a bias cast with the model
        (`model.to(torch.bfloat16)`, or 5.17's DeepSeek-V4 built in bf16) keeps a bf16 router's choice in bf16."""
        if bias_dtype is None:
            return self.score_dtype
        import torch

        promoted = torch.promote_types(self.score_dtype.torch, bias_dtype)
        found = [d for d in WeightsDtype if d.torch == promoted]
        if not found:
            allowed = [d.value for d in WeightsDtype]
            raise ValueError(f"RouterSpec.choice_dtype: a {self.score_dtype.value} router with a {bias_dtype} "
                             f"correction bias chooses in {promoted}, expected one of {allowed}")
        return found[0]

    def op_kwargs(self) -> dict:
        """The spec as the route ops' keyword arguments: the fields that differ from their defaults (top_k
        always)."""
        kwargs = {"top_k": self.top_k}
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value != f.default:
                kwargs[f.name] = value.value if isinstance(value, enum.Enum) else value
        return kwargs

    def describe(self) -> str:
        stored = "" if self.weights_dtype is WeightsDtype.FLOAT32 else f"; weights stored as {self.weights_dtype.value}"
        computed = "" if self.score_dtype is WeightsDtype.FLOAT32 else f"; computed in {self.score_dtype.value}"
        return self._form() + computed + stored

    def _form(self) -> str:
        if self.order is RouteOrder.SPARSEMIXER:
            return (
                f"sparse mixer, {self.top_k} rounds of argmax, softmax over the experts within "
                f"{2 * self.jitter_eps:g} (relative) of each round's best"
            )
        if self.order is RouteOrder.TOPK_THEN_SCORE:
            if self.scoring is Scoring.SIGMOID:
                return ", ".join([f"top-{self.top_k} of the logits, then sigmoid of each", *self._after_weights()])
            return f"top-{self.top_k} of the logits, then softmax over them"
        parts = [f"{self.scoring.value}, top-{self.top_k}"]
        if self.n_group > 1:
            parts.append(
                f"best {self.topk_group} of {self.n_group} groups "
                f"({self.group_score.value}, others {self.masked_score})"
            )
        return ", ".join(parts + self._after_weights())

    def _after_weights(self) -> list[str]:
        """What follows the weights' scoring: the renormalization and the scale, if any."""
        parts = []
        if self.norm_topk_prob:
            default = self.renorm_eps == RouterSpec.renorm_eps
            parts.append("renormalized" if default else f"renormalized (top-k sum + {self.renorm_eps:g})")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"x {self.routed_scaling_factor}")
        return parts


@dataclasses.dataclass(frozen=True)
class SharedMLP:
    """The block's shared experts as the experts op reads them: the block's own nn.Linear weights ([out, in]),
    in place. Gate and up are two [Is, H] tensors or the halves of one [2Is, H] (gate rows first); the
    activation is the routed experts' (ExpertsSpec.activation), always with concatenated gate / up."""

    gate: object  # [Is, H] (a view of the fused [2Is, H] weight when there is one)
    up: object  # [Is, H]
    down: object  # [H, Is]
    expert_gate: object | None  # [1, H] for the sigmoid-gated form, else None

    @classmethod
    def from_parts(cls, gate_proj, up_proj, down_proj, expert_gate) -> SharedMLP:
        """up_proj None: gate_proj is one [2Is, H] weight, split into its halves as views (no copy)."""
        if up_proj is None:
            gate_proj, up_proj = gate_proj.chunk(2, dim=0)
        return cls(gate_proj, up_proj, down_proj, expert_gate)

    @property
    def intermediate(self) -> int:
        return self.down.shape[1]
