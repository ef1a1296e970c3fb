"""The RDU: a model of SambaNova's reconfigurable dataflow unit, what fusec places and times on it.

    placement.py   the placement of a program on the chip (plain data the `place` pass builds)
    model.py       its time and memory model (`fusec.compile(..., target="rdu")` reports it)
    paper.py       the published figures it is checked against; calibrate.py fits its constants to them
    view.py        the placement as text and JSON; picture.py as SVG/PNG (matplotlib)
    cli.py         `fusec rdu` and `fusec dump --stage placed`

Not a backend: nothing here runs a program. Importing the package loads none of its modules (the pass
layer imports `placement` alone).
"""
