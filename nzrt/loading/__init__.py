"""Models from files, and whole models into ``.nzrt`` files: the loading half of the library.

Used alike by ``nzrt.from_pretrained``, ``run.save`` (``nzrt.runtime.saving``) and the command line;
it never imports the runtime's handle (only ``nzrt.runtime.params``' plan) nor the CLI. Its modules:

* ``errors``: ModelError, GGUFError and the one-line help they end with;
* ``loaded``: ``LoadedModel`` and the rules every loader applies (``kind_of``, ``finish``, ``parse_dtype``);
* ``open_model``: what a path or ``package.module:factory`` names, and loading it;
* ``transformers_dir``, ``gguf``, ``factory``, ``nzrt_file``: one loader per kind of source;
* ``safetensors_io``: safetensors read one tensor at a time (no memory map);
* ``entries``: the model metadata and tokenizer/input entries a model ``.nzrt`` holds;
* ``compress``: a whole model (loaded, or a transformers directory streamed) into a ``.nzrt``.
"""
