"""What a quantized weight is: bit width and scale layout. No torch here, so that command lines can offer
the schemes (SCHEMES, DEFAULT_GROUP_SIZE) before torch loads."""

from __future__ import annotations

import dataclasses

SCHEMES = ("row", "group")
DEFAULT_GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    """What `quantize` writes: bit width, and the scale layout ("row": per output row, as the original;
    "group": per `group_size` input columns)."""

    bits: int
    scheme: str = "row"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization bit width {self.bits} is not supported; choose 4 or 8")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme '{self.scheme}'; choose {' or '.join(SCHEMES)}")
        if self.scheme == "row" and self.group_size is not None:
            raise ValueError("the 'row' scheme has one scale per row: give no group size, or scheme 'group'")
        if self.scheme == "group":
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            if self.group_size < 2 or self.group_size % 2:
                raise ValueError(f"quantization group size {self.group_size} must be an even number >= 2")

    @property
    def max_value(self) -> int:
        return 2 ** (self.bits - 1) - 1  # 127 or 7: symmetric, -8 is never used (as the original)

    def groups(self, in_features: int) -> int:
        if self.scheme == "row":
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"{in_features} input columns are not divisible by the quantization group size "
                f"{self.group_size}; choose a group size that divides it"
            )
        return in_features // self.group_size

    def packed_columns(self, in_features: int) -> int:
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"INT4 packs two columns per byte: {in_features} input columns must be even")
        return in_features * self.bits // 8
