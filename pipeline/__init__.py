"""The pipeline below the programs that run turns and jobs (the gateway, the
render workers) and above the stage services: typed stage clients
(`stages`), a turn's reply through them (`turns`), a turn from question to
archive (`runner`), the archive (`archive`), the render-job queue
(`jobs_queue`) and their settings (`config`)."""
