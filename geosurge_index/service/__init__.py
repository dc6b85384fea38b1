"""The HTTP service (`geosurge serve`), one module per job:

- `routes.py`: the list of routes and status codes, written once (pure data, no FastAPI: `geosurge
  serve --help` prints it);
- `app.py`: `create_app(settings, locator=None)`, the FastAPI app and its routes;
- `requests.py`: request parsing (multipart or JSON base64, image counts, the body-size limit)
  and upload decoding, with `ApiError`;
- `immich.py`: the immich machine-learning adapter (`/ping`, `/predict`, its `entries` field);
- `state.py`: what the routes share (`ServiceState`, `ModelJob`, the JSON mapping, the cells);
- `runner.py`: serving an app from a thread (`ServerThread`) or `geosurge serve` in a subprocess
  (`ServeProcess`).

Its settings are `geosurge_index.settings.ServiceSettings`; its micro-batching is
`geosurge_index.batcher.MicroBatcher`. Importing this package imports nothing heavy.
"""
