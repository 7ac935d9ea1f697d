"""The Triton entry points: each file here is copied into a built repository as a
model's `1/model.py` and runs only inside a Python-backend stub (it imports
`triton_python_backend_utils`), so nothing imports these modules. They ship as the
package `abdoserve.serving.python_models` so that a build finds them as package
resources, in a checkout or in a plain `pip install .` alike.
"""
