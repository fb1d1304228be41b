"""Generation: the native engine, sampling, forced lengths for benchmarks."""

from fusedrl.generation.engine import GenerationEngine, Request, Sample
from fusedrl.generation.lengths import forced_lengths
from fusedrl.generation.sampling import SamplingParams

__all__ = ["GenerationEngine", "Request", "Sample", "SamplingParams", "forced_lengths"]
