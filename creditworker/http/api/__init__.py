"""The HTTP gateway's `/credits` API: one module per resource under `routes/`, assembled by
`routing.build_router` in one of two modes (through the workers, or in this process), and
served by `app.create_app` together with the console."""
