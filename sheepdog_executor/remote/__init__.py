"""What runs on the compute nodes: stdlib only (plus cloudpickle, served by the client).

Nothing in this package may import the rest of sheepdog_executor: the client ships these files to
the nodes as they are, inside a stub ``sheepdog_executor`` package.
"""
