"""Package layout only; everything else is in pyproject.toml.

migrations/ and policies/ stay at the top of the checkout, where Alembic
authors and operators look for them, and ship inside the package as
``keyd.migrations`` and ``keyd.policies``: keyd finds them through
importlib.resources, in a wheel, an sdist build or an editable install alike.
A setup.py because pyproject's ``packages.find`` cannot add packages that
live outside the folder it searches.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["keyd", "keyd.*"]), "keyd.migrations", "keyd.policies"],
    package_dir={"keyd.migrations": "migrations", "keyd.policies": "policies"},
    package_data={
        "keyd.migrations": ["script.py.mako", "versions/*.py"],
        "keyd.policies": ["*.toml", "vault/*.hcl"],
    },
)
