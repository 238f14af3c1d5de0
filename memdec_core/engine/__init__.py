"""Engine: the computation. Sliding-window scoring, knob grids, the mixture of a base and a memory
(tuned on validation), the composite causal LM, generation, log-likelihoods, latency and the
training loop.

Imports the layers below it: inputs, store, components, runtime, contracts.
"""
