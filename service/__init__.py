"""The scoring service: a FastAPI app (``service.app.create_app``) that ``serve.py`` runs on uvicorn.

``app.py`` holds the routes and limits, ``scorer.py`` the worker threads that run the model behind a bounded
queue, ``uploads.py`` the streaming reader of multipart uploads, ``static/`` the web page. Importing the
package imports nothing heavy.
"""
