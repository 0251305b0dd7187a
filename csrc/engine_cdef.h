/* The whole C boundary as cffi sees it (no preprocessor lines here). */
const char *fl_engine_version(void);
