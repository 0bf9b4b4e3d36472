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
    packages=[
        *find_packages(include=["keyd", "keyd.*"]),
        # data folders: named here so setuptools ships them without warning
        "keyd.migrations", "keyd.migrations.versions", "keyd.policies", "keyd.policies.vault",
    ],
    package_dir={"keyd.migrations": "migrations", "keyd.policies": "policies"},
    package_data={
        # Templates and static files beside any package (the admin console's) ship too.
        "": ["templates/*", "templates/**/*", "static/*", "static/**/*"],
        "keyd.migrations": ["script.py.mako"],
        "keyd.migrations.versions": ["*.py"],
        "keyd.policies": ["*.toml"],
        "keyd.policies.vault": ["*.hcl"],
    },
)
