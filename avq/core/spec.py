"""Quantization specs: small frozen dataclasses that say *what* to store, never *how* to find it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

CONV_GROUPINGS = ("k", "kernel")


@dataclass(frozen=True)
class QuantSpec:
    """Additive quantization of one layer: `M` codebooks of `2**B` codewords of length `g`.

    Each group of `g` weights is stored as `M` codes (one per codebook) and decoded as the sum of the
    selected codewords times a per-output-channel scale. For convolutions, `conv_grouping="k"` takes `g`
    consecutive entries of the flattened `[out, in*kh*kw]` weight, `"kernel"` one whole `kh x kw` kernel
    (KAQ; `g` must then equal `kh*kw`).
    """

    num_codebooks: int
    nbits: int
    group_size: int
    conv_grouping: str = "k"

    def __post_init__(self) -> None:
        for name in ("num_codebooks", "nbits", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"QuantSpec.{name} must be an int, got {value!r}")
        if not 1 <= self.num_codebooks <= 4:
            raise ValueError(f"QuantSpec.num_codebooks must be in 1..4, got {self.num_codebooks}")
        if not 4 <= self.nbits <= 16:
            raise ValueError(f"QuantSpec.nbits must be in 4..16, got {self.nbits}")
        if not 2 <= self.group_size <= 16:
            raise ValueError(f"QuantSpec.group_size must be in 2..16, got {self.group_size}")
        if self.conv_grouping not in CONV_GROUPINGS:
            raise ValueError(
                f"QuantSpec.conv_grouping must be one of {CONV_GROUPINGS}, got {self.conv_grouping!r}"
            )

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits

    @property
    def code_bits(self) -> float:
        """Bits of codes per weight, M*B/g (what papers call W2/W4); excludes codebooks and scales."""
        return self.num_codebooks * self.nbits / self.group_size

    @property
    def name(self) -> str:
        """Short label such as `2x8g8` (or `1x8g9k` for kernel grouping)."""
        suffix = "k" if self.conv_grouping == "kernel" else ""
        return f"{self.num_codebooks}x{self.nbits}g{self.group_size}{suffix}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        unknown = set(data) - {"num_codebooks", "nbits", "group_size", "conv_grouping"}
        if unknown:
            raise ValueError(f"unknown QuantSpec fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """Parse the `name` form, e.g. `2x8g8` or `1x8g9k`."""
        import re

        match = re.fullmatch(r"(\d+)x(\d+)g(\d+)(k?)", text.strip())
        if not match:
            raise ValueError(
                f"cannot parse spec {text!r}: expected e.g. '2x8g8' (MxBgG, 'k' suffix for kernel)"
            )
        m, b, g, kernel = match.groups()
        return cls(int(m), int(b), int(g), "kernel" if kernel else "k")


UNIFORM_BITS = (2, 8)  # the widths the uniform layers store (`avq.core.baselines.MIN_BITS, MAX_BITS`)


@dataclass(frozen=True)
class UniformSpec:
    """A uniform (GPTQ) grid of one layer: `bits`-bit levels with an fp16 scale and zero per output row, or
    per row and group of `group_size` inputs. LAQ's uniform candidates (`QuantizeConfig.laq_uniform`)."""

    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        low, high = UNIFORM_BITS
        if not (isinstance(self.bits, int) and low <= self.bits <= high):
            raise ValueError(f"UniformSpec: bits must be an int from {low} to {high}, got {self.bits!r}")
        if self.group_size is not None and not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"UniformSpec: group_size must be an int >= 1 or None, got {self.group_size!r}")

    @property
    def code_bits(self) -> float:
        return float(self.bits)

    @property
    def name(self) -> str:
        """`int2` (one grid per row), `int4g128` (a grid per 128 inputs)."""
        return f"int{self.bits}" + (f"g{self.group_size}" if self.group_size else "")

    @classmethod
    def parse(cls, text: str) -> UniformSpec:
        """Parse the `name` form, e.g. `int4` or `int4g128`."""
        import re

        match = re.fullmatch(r"int(\d+)(?:g(\d+))?", text.strip())
        if not match:
            raise ValueError(f"cannot parse uniform spec {text!r}: expected e.g. 'int4' or 'int4g128'")
        bits, group = match.groups()
        return cls(int(bits), int(group) if group else None)
