"""Shape of a Llama-family model (the ``ModelConfig`` of docs/design.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int
    """Number of token ids (rows of ``embed_tokens`` and ``lm_head``)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP (``gate_proj``/``up_proj`` output)."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (GQA); divides ``num_heads``."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is used with (RoPE table size)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_word_embeddings: bool = False
    """Whether the checkpoint ties ``lm_head`` to ``embed_tokens`` (untied on load)."""
    head_dim: int = field(default=0)
    """Per-head width; 0 means ``hidden_size // num_heads``."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide "
                f"model.num_heads={self.num_heads}"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"model.num_heads={self.num_heads} does not divide "
                    f"model.hidden_size={self.hidden_size}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, value_head: bool = False) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = h if value_head else v * h
        return v * h + self.num_layers * layer + h + head


PRESETS: dict[str, ModelConfig] = {
    # A few hundred thousand parameters: trains from scratch on a laptop CPU in minutes.
    "tiny": ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=4,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=256),
    "small": ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=8,
                         num_heads=8, num_kv_heads=4, max_position_embeddings=1024),
    # ~110M parameters, for realloc/generation benchmarks.
    "base100m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                            num_layers=12, num_heads=12, num_kv_heads=4,
                            max_position_embeddings=2048),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3,
                                max_position_embeddings=8192, rope_theta=100000.0,
                                tie_word_embeddings=True),
    # Qwen2.5-0.5B-Instruct's shape (its config.json), for the simulator's check against
    # verl's published GSM8K run (configs/verl-gsm8k-qwen05b.yaml); built from scratch it is
    # a Llama without Qwen2's q/k/v biases (1152 parameters a layer, 0.006% of the model).
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2,
                                max_position_embeddings=32768, rope_theta=1000000.0,
                                rms_norm_eps=1e-6, tie_word_embeddings=True),
    # LLaMA shapes (Touvron et al. 2023; 33B is the paper's "30B") for the cluster
    # simulator (`fusedrl simulate`); 4096 positions so 2048-token generations fit.
    "llama-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_layers=32, num_heads=32, num_kv_heads=32,
                            max_position_embeddings=4096),
    "llama-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                             num_layers=40, num_heads=40, num_kv_heads=40,
                             max_position_embeddings=4096),
    "llama-33b": ModelConfig(vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                             num_layers=60, num_heads=52, num_kv_heads=52,
                             max_position_embeddings=4096),
    "llama-65b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                             num_layers=80, num_heads=64, num_kv_heads=64,
                             max_position_embeddings=4096),
    # Llama 2 70B: grouped-query attention with 8 kv heads.
    "llama2-70b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8,
                              max_position_embeddings=4096),
}
