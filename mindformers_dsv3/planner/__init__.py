"""The layout planner (``dsv3-plan``): checks a YAML's parallel layout against the model and plans each
device's memory. It sits on top of the library: nothing in mindformers_dsv3 imports it (the converter may,
for ``dsv3-convert --layout``).

plan.py (Plan, ``make_plan``), settings.py (reading a YAML / config, ``validate_layout``), shapes.py (the
shape-only model), activations.py (activation estimates), report.py (the text report, doc figures),
sharding_check.py (``--sharding``), cli.py (``dsv3-plan``). Import what you use from its module (this
package imports none of them: a package that imports its own modules is an import cycle).
"""
