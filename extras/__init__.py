"""What a learner does not need to learn the method, below the files at the top that hold it.

- `checks`: train.py's flags checked from the model's config alone, the budget rule applied.
- `plan`: what a row costs, memory, the groups of a scope that fit --max-memory.
- `flags`: every numeric flag's range, checked right after parsing.
- `tracking`: experiment tracking (Weights & Biases, a JSON-lines file, or a no-op logger).
- `activations`: pre-saved activation files and the activation cache (App. A.3).
- `scope`: a folder of SAEs over layers and sites, evaluated in one pass (Fig. 10).
- `long_context`, `chats`: §4.5's generalization protocols (long documents, instruct chats).
- `features`: a feature's top-activating contexts and decoder neighbours, its HTML page.
- `interop`: released Llama Scope SAEs in, SAELens's format out.
- `saebench`: SAEBench's core evaluation, run its way.
- `plots`: the paper's figures as PNG files.
- `synthetic`: activations with known feature directions (planted.py's answer key).
These import the method's files at the top; at the top only the scripts import these.
"""
