"""Compile time: find attention in a Dynamo graph, decide each site (FA4 or a reason) and rewrite it into FA4 ops.

Graph analysis (masks, score_mods, in-place writes, the table of modeled ops) decides and explains; emission writes
the graph; the Inductor pass and the pattern registry run them. Uses only the op schemas and support rules of
:mod:`fa4_inductor.runtime`.
"""
