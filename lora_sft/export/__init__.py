"""A finished run: reopened (`reopen`), evaluated (`evaluation`), exported as an adapter and merged weights with
their fidelity proven (`merge`), as GGUF checked in llama.cpp (`gguf`, `serving`), with its model cards (`card`), pushed
to the hub (`hub`)."""
