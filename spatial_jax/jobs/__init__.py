"""The jobs `main` runs, one module per registry name (`registry.JOBS`), each a `run(config,
workdir)` read top to bottom. Jobs sit on the top floor: they import the library (data, models,
reward, diffusion, rl) and never the other way round."""
