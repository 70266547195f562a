"""The load tools users run against a live gateway: ``pdserve bench`` (load_test), ``pdserve soak``
and ``pdserve goodput`` (a goodput sweep over request rates)."""
