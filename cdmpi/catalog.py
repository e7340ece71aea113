"""The algorithms and compressors by name, without their code (no torch): what the command line lists and
what the config checks before anything heavy is imported. cdmpi.algorithms and cdmpi.compress hold the
code, registered under these names."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CdmpiError

COMPRESSORS = ("scaled_sign", "two_level_sign", "topk", "randk", "identity")
COMPRESSED = ("scaled_sign", "two_level_sign", "topk", "randk")
BLOCKED = ("scaled_sign", "two_level_sign")  # the compressors that take compress.block
MARKOV = ("cdadam", "ef21")  # the algorithms that take compress.warmup_steps


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    compressors: tuple[str, ...]  # the compressors it makes sense with; the first is its default
    description: str


ALGORITHMS: dict[str, AlgorithmInfo] = {
    a.name: a for a in (
        AlgorithmInfo("cdadam", ("scaled_sign", "two_level_sign", "topk", "randk", "identity"),
                      "CD-Adam (Algorithm 1): Markov-compressed both ways, AMSGrad on the workers"),
        AlgorithmInfo("amsgrad", ("identity",), "uncompressed distributed AMSGrad (Section 3): fp32 frames both ways"),
        AlgorithmInfo("amsgrad-ef", COMPRESSED,
                      "AMSGrad with error feedback at every worker and at the server (Section 4)"),
        AlgorithmInfo("amsgrad-naive", COMPRESSED,
                      "AMSGrad on compressed gradients, compressed again by the server, no memory (Section 4)"),
        AlgorithmInfo("ef21", ("topk", "scaled_sign", "two_level_sign", "randk"),
                      "EF21: Markov-compressed both ways (Section 7.2), SGD on the workers"),
        AlgorithmInfo("onebit-adam", COMPRESSED,
                      "1-bit Adam (Tang et al. 2021): optim.warmup_steps of fp32 Adam, then frozen variance "
                      "and error-fed compressed momentum"),
    )
}


def check(name: str, compressor: str) -> AlgorithmInfo:
    """The algorithm, if it exists and takes the compressor (or "auto"); CdmpiError naming the choices."""
    if compressor != "auto" and compressor not in COMPRESSORS:
        raise CdmpiError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)} or auto")
    info = ALGORITHMS.get(name)
    if info is None:
        raise CdmpiError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    if compressor != "auto" and compressor not in info.compressors:
        raise CdmpiError(f"algorithm {name!r} does not work with compressor {compressor!r}; "
                         f"it takes {', '.join(info.compressors)} (or auto)")
    return info


def compressor_for(name: str, compressor: str) -> str:
    """The compressor a run uses: the configured one, or the algorithm's default for 'auto'."""
    info = check(name, compressor)
    return info.compressors[0] if compressor == "auto" else compressor
