"""Composition of Experts: many compiled experts behind a router, with a three-tier weight store.

`CoE` (serve.py) routes requests and answers them; `ExpertPool` (pool.py) serves experts on one machine,
one compiled program per architecture; `WeightStore` (store.py) keeps resident weights under a budget;
experts.py reads expert files (the DDR tier); router.py has the routers; switching.py models switching
on SN40L against GPU host links; cluster.py spreads pools over Ray actors.
"""
from fusec.coe.experts import Architecture, ExpertError, FileExpert, ModuleExpert, save_expert
from fusec.coe.pool import ExpertPool
from fusec.coe.serve import CoE, CoEResult
from fusec.coe.store import LFU, LRU, WeightStore

__all__ = ["Architecture", "CoE", "CoEResult", "ExpertError", "ExpertPool", "FileExpert", "LFU", "LRU",
           "ModuleExpert", "WeightStore", "save_expert"]
