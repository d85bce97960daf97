"""dslaunch: a drop-in for DeepSpeed's launcher with a Rust process supervisor.

Importing the package is cheap on purpose: the CLI's start-up path must not pull in torch or the
native core until it needs them.
"""

__all__ = ['__version__']

__version__ = '0.1.0'
