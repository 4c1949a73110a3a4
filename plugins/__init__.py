"""Built-in compression methods, one folder each; installed as ``compress.plugins`` and registered through
the ``compress.plugins`` entry-point group like any third-party plugin."""
