"""tokenmill plan: capacity and cost planning on the engine's own scheduler.

The simulator drives the production Scheduler and KVCacheManager with a cost model on a
virtual clock (simulator.py); the cost model is a roofline over each step's composition
(cost.py) with efficiencies fitted on real engine steps (calibrate.py, the one module that
runs torch); pool sizes come from a memory model (memory.py) over the catalog's shapes
(catalog.py); search.py finds the cheapest fleet that meets an SLO.
"""
