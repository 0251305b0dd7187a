#ifndef FASTLANE_ENGINE_H
#define FASTLANE_ENGINE_H
const char *fl_engine_version(void);
#endif
