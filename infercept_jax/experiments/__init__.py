"""The research harness around the engine: tool-calling workloads and their trace files, trace
replay and its metrics, the simulator (the real engine on a virtual clock with a cost model),
sweeps over policies and rates, the sustainable-rate measure, length-model training data, and
the records benchmarks write. Nothing here is needed to serve requests; the simulator and the
replay import neither JAX nor a model."""
