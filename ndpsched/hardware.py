"""Hardware specifications: GPU, NDP-DIMM (DDR4 geometry + NDP core), DIMM-link, PCIe, host CPU.

All specs are frozen dataclasses with units in field names. Values come from the YAML presets in
``ndpsched/presets/`` where each number cites its source (or says it is a chosen default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

GB = 1e9  # bandwidths and capacities in this package use decimal giga (GB/s, GB) unless named _gib
GIB = 2**30


def check_non_negative_fields(obj: object, what: str) -> None:
    """Raise ConfigError naming the first numeric dataclass field of ``obj`` that is negative."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{what} {f.name} must be >= 0, got {v}")


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class GpuSpec:
    """A GPU as a roofline: memory bandwidth, tensor throughput, and fixed kernel costs."""

    name: str
    memory_bytes: float
    memory_bw_gbps: float
    fp16_tflops: float
    pcie_gen: int
    #: fraction of peak memory bandwidth a dense GEMV reaches (chosen default, see presets)
    dense_bw_efficiency: float = 0.85
    #: fraction of peak bandwidth a gathered-row sparse GEMV reaches (chosen default)
    sparse_bw_efficiency: float = 0.70
    #: fraction of peak tensor FLOP/s reached by small-batch GEMM (chosen default)
    compute_efficiency: float = 0.60
    #: fixed cost of one kernel launch + tail, in microseconds (chosen default)
    kernel_overhead_us: float = 5.0
    #: memory kept for the CUDA context, activations and workspace, never given to weights
    reserved_bytes: float = 1.5e9
    price_usd: float = 0.0
    source: str = ""
    #: measured profile (``ndpsched calibrate gpu``): a file shipped under ``ndpsched/data/`` or a
    #: path; when set, the cost model prices GPU kernels from its tables inside their measured
    #: range and from this roofline outside it. Empty: roofline only.
    profile: str = ""

    def __post_init__(self) -> None:
        _check_positive(self, "memory_bytes", "memory_bw_gbps", "fp16_tflops")
        for name in ("dense_bw_efficiency", "sparse_bw_efficiency", "compute_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"GpuSpec.{name} must be in (0, 1], got {value!r}")
        if self.pcie_gen not in (3, 4, 5):
            raise ConfigError(f"GpuSpec.pcie_gen must be 3, 4 or 5, got {self.pcie_gen!r}")

    @property
    def usable_bytes(self) -> float:
        """Memory available for weights (total minus the reserve)."""
        return self.memory_bytes - self.reserved_bytes


@dataclass(frozen=True)
class DimmSpec:
    """One NDP-DIMM: DDR4 geometry and timings (Hermes Table II) and its NDP core.

    The internal bandwidth the NDP core sees is derived from the geometry, see
    :attr:`internal_bw_gbps`.
    """

    name: str
    capacity_bytes: float
    data_rate_mtps: float
    bus_width_bits: int
    channels: int
    dimms_per_channel: int
    ranks: int
    bank_groups: int
    banks_per_group: int
    tRC: int
    tRCD: int
    tCL: int
    tRP: int
    tBL: int
    tCCD_S: int
    tCCD_L: int
    tRRD_S: int
    tRRD_L: int
    tFAW: int
    #: fraction of the derived internal peak reached when streaming neuron rows (chosen default)
    bw_efficiency: float = 0.90
    # NDP core in the buffer chip
    ndp_multipliers: int = 256
    ndp_fp16_lanes: int = 8
    #: cycles one bit-serial multiplier takes for its 8-lane FP16 multiply (chosen: 16 = one per bit)
    ndp_cycles_per_multiply: int = 16
    ndp_clock_ghz: float = 1.0
    ndp_buffer_bytes: int = 256 * 1024
    price_usd: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        _check_positive(
            self, "capacity_bytes", "data_rate_mtps", "bus_width_bits", "ranks", "bank_groups",
            "banks_per_group", "ndp_multipliers", "ndp_fp16_lanes", "ndp_cycles_per_multiply",
            "ndp_clock_ghz", "tBL", "tCCD_L",
        )
        if not 0 < self.bw_efficiency <= 1:
            raise ConfigError(f"DimmSpec.bw_efficiency must be in (0, 1], got {self.bw_efficiency!r}")

    @property
    def pin_bw_gbps(self) -> float:
        """Host-visible peak of one DDR4 bus: bus width x data rate (3200 MT/s x 8 B = 25.6 GB/s)."""
        return self.bus_width_bits / 8 * self.data_rate_mtps * 1e6 / GB

    @property
    def internal_peak_bw_gbps(self) -> float:
        """Peak bandwidth the NDP core in the buffer chip can draw from its own DRAM.

        Derivation (Hermes Fig. 1 labels 8 NDP-DIMMs "~1.6 TB/s", i.e. ~200 GB/s each): the
        buffer chip reads every rank in parallel (rank-level parallelism, no shared host bus) and,
        within a rank, the bank groups in parallel, each at the full pin rate:
        ``ranks x bank_groups x pin_bw = 4 x 2 x 25.6 = 204.8 GB/s``.  Timing check: one bank
        group alone is limited by tCCD_L (a burst of tBL=4 cycles every tCCD_L=8 cycles, 50 %);
        two groups interleaved at tCCD_S=4 fill the slot, which is why the paper's figure needs
        per-bank-group data paths into the buffer. Row activations (tRCD + tRP = 48 cycles per
        8 KB page, hidden by 4 banks per group, 4 ACTs per tFAW=26) are folded into
        :attr:`bw_efficiency`.
        """
        return self.ranks * self.bank_groups * self.pin_bw_gbps

    @property
    def internal_bw_gbps(self) -> float:
        """Effective internal bandwidth: :attr:`internal_peak_bw_gbps` x :attr:`bw_efficiency`."""
        return self.internal_peak_bw_gbps * self.bw_efficiency

    @property
    def ndp_macs_per_s(self) -> float:
        """FP16 multiply-accumulates per second of the NDP GEMV unit.

        256 multipliers x 8 FP16 lanes / 16 cycles (bit-serial) x 1 GHz = 128 GMAC/s
        (256 GFLOP/s, the paper's "hundreds of GFLOPS").
        """
        return (self.ndp_multipliers * self.ndp_fp16_lanes / self.ndp_cycles_per_multiply
                * self.ndp_clock_ghz * 1e9)


@dataclass(frozen=True)
class DimmLinkSpec:
    """Point-to-point link between NDP-DIMMs (Hermes section on DIMM-link)."""

    bw_gbps: float = 25.0
    energy_pj_per_bit: float = 1.17
    #: fixed cost of one transfer (chosen default)
    latency_us: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        _check_positive(self, "bw_gbps")


@dataclass(frozen=True)
class PcieSpec:
    """PCIe x16 between host (and its DIMMs) and the GPU."""

    gen: int
    lanes: int = 16
    #: achievable fraction of the per-direction link rate for pinned copies (chosen default)
    efficiency: float = 0.80
    #: energy of moving one bit over PCIe, for migration-energy rewards (chosen default)
    energy_pj_per_bit: float = 5.0
    source: str = ""

    _GT_PER_S = {3: 8.0, 4: 16.0, 5: 32.0}

    def __post_init__(self) -> None:
        if self.gen not in self._GT_PER_S:
            raise ConfigError(f"PcieSpec.gen must be one of 3, 4, 5, got {self.gen!r}")
        _check_positive(self, "lanes", "efficiency")

    @property
    def peak_bw_gbps(self) -> float:
        """Per-direction link rate: GT/s x lanes x 128/130 encoding / 8 bits (gen4 x16: 31.5 GB/s).

        Hermes' "64 GB/s" for PCIe 4.0 x16 is both directions together.
        """
        return self._GT_PER_S[self.gen] * self.lanes * 128 / 130 / 8

    @property
    def bw_gbps(self) -> float:
        """Effective host-to-device bandwidth: peak x efficiency."""
        return self.peak_bw_gbps * self.efficiency


@dataclass(frozen=True)
class DiskSpec:
    """An NVMe disk: the slowest memory tier (weights of offloading systems that do not fit DRAM)."""

    name: str
    read_bw_gbps: float
    latency_us: float
    capacity_bytes: float
    price_usd: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        _check_positive(self, "read_bw_gbps", "capacity_bytes")


@dataclass(frozen=True)
class HostCpuSpec:
    """Host CPU (runs the scheduler; computes cold neurons in the PowerInfer-style baseline)."""

    name: str
    memory_bw_gbps: float
    fp16_gflops: float
    cores: int
    price_usd: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        _check_positive(self, "memory_bw_gbps", "fp16_gflops", "cores")


@dataclass(frozen=True)
class HardwareSpec:
    """The whole machine: one GPU, ``n_dimms`` NDP-DIMMs, DIMM-link, PCIe and host CPU."""

    gpu: GpuSpec
    dimm: DimmSpec
    n_dimms: int
    dimm_link: DimmLinkSpec
    pcie: PcieSpec
    host: HostCpuSpec
    disk: DiskSpec | None = None

    MAX_DIMMS = 16

    def __post_init__(self) -> None:
        if not isinstance(self.n_dimms, int) or not 1 <= self.n_dimms <= self.MAX_DIMMS:
            raise ConfigError(f"n_dimms must be an integer in 1..{self.MAX_DIMMS}, got {self.n_dimms!r}")

    @property
    def dimm_total_bytes(self) -> float:
        return self.dimm.capacity_bytes * self.n_dimms

    def replace(self, **changes: object) -> "HardwareSpec":
        return dataclasses.replace(self, **changes)


def spec_fields(cls: type) -> list[str]:
    """Names of the init fields of a spec dataclass (used to validate preset keys)."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


__all__ = [
    "GB", "GIB", "GpuSpec", "DimmSpec", "DimmLinkSpec", "PcieSpec", "HostCpuSpec", "DiskSpec", "HardwareSpec",
    "spec_fields", "check_non_negative_fields",
]
