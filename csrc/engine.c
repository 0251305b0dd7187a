#include "engine.h"
const char *fl_engine_version(void) { return "0"; }
