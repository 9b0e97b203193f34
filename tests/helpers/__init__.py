"""What the tests (and the benchmarks) share: doubles, waits and scaffolding, one home each.

- ``fake_vast``: :class:`FakeVast`, the Vast endpoint an instance's watchdog calls.
- ``waiting``: :func:`until` (async), :func:`wait_until` and :func:`eventually` (sync).
- ``oracle``: the official ``vastai`` CLI in its own virtualenv, and :class:`Oracle`.
- ``sandbox``: the sshd-in-a-namespace instance, the sandbox skip checks, and how a user
  meets an emulated instance (OpenSSH options, ``ssh``, ``make_spec``, ``wait_for_log``).
- ``control_plane``: the emulated Vast API over plain HTTP (``call``, ``rent``, ``show``, ...)
  and ``ScriptedRuntime``, a runtime the test scripts.
- ``checkout``: the repository root, the example workflow, and the env a ``snakemake``
  subprocess needs to find the plugin in the checkout.

Import them as ``from tests.helpers.<module> import ...``: pytest finds ``tests`` from the
repository root (``pythonpath`` in ``pyproject.toml``), benchmarks run as
``python -m benchmarks.<name>`` from there.
"""
