//! Dataset validation: every rejected row names its line, field and reason; CSV and JSONL;
//! label inference; SFT loss masks; seeded batching.

use sparsegrad_engine::data::{
    encode_records, epoch_order, infer_task, parse_records, Message, RawLabel, Record,
    RecordReader, StreamingCheck, Target, TextTokenizer, MAX_CLASSES, MAX_ROW_BYTES,
};
use sparsegrad_engine::models::{Arch, Task};
use sparsegrad_engine::Error;

fn err(bytes: &[u8]) -> (usize, Option<String>, String) {
    match parse_records(bytes) {
        Err(Error::Data {
            line,
            field,
            reason,
        }) => (line, field, reason),
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn malformed_json_names_the_line() {
    let (line, field, reason) =
        err(b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"broken\", \"label\": \n");
    assert_eq!((line, field), (2, None));
    assert!(reason.contains("malformed JSON"), "{reason}");
}

#[test]
fn missing_field_names_line_and_field() {
    let (line, field, _) = err(b"{\"text\": \"ok\", \"label\": 1}\n\n{\"text\": \"no label\"}\n");
    assert_eq!((line, field.as_deref()), (3, Some("label")));
    let (line, field, _) = err(b"{\"label\": 1}\n");
    assert_eq!((line, field.as_deref()), (1, Some("text")));
    let (line, field, _) = err(b"{\"prompt\": \"p\"}\n");
    assert_eq!((line, field.as_deref()), (1, Some("completion")));
}

#[test]
fn unknown_label_type_is_rejected() {
    let (line, field, reason) = err(b"{\"text\": \"a\", \"label\": true}\n");
    assert_eq!((line, field.as_deref()), (1, Some("label")));
    assert!(
        reason.contains("unsupported label type: a boolean"),
        "{reason}"
    );
    let (line, field, reason) =
        err(b"{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": 3}\n");
    assert_eq!((line, field.as_deref()), (2, Some("label")));
    assert!(reason.contains("line 1"), "{reason}");
}

#[test]
fn empty_file_is_rejected() {
    let (line, _, reason) = err(b"");
    assert_eq!(line, 0);
    assert!(reason.contains("empty"));
    let (_, _, reason) = err(b"\n  \n\n");
    assert!(reason.contains("empty"));
    let (_, _, reason) = err(b"text,label\n");
    assert!(reason.contains("empty"), "{reason}");
}

#[test]
fn invalid_utf8_names_the_line() {
    let (line, _, reason) =
        err(b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"bad \xff\xfe\", \"label\": 0}\n");
    assert_eq!(line, 2);
    assert!(reason.contains("invalid UTF-8"), "{reason}");
    let (line, _, reason) = err(b"text,label\ngood,1\n\xc3\x28,0\n");
    assert_eq!(line, 3);
    assert!(reason.contains("invalid UTF-8"), "{reason}");
}

#[test]
fn other_rejections_name_the_field() {
    let (_, field, _) = err(b"[1, 2]\n");
    assert_eq!(field, None);
    let (line, field, reason) =
        err(b"{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n");
    assert_eq!((line, field.as_deref()), (1, Some("messages[0].role")));
    assert!(reason.contains("robot"), "{reason}");
    let (_, field, _) = err(b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    assert_eq!(field.as_deref(), Some("messages"));
    let (_, field, _) = err(b"{\"text\": \"   \", \"label\": 1}\n");
    assert_eq!(field.as_deref(), Some("text"));
    let (line, _, reason) = err(b"text,label\na,1\nb,1,extra\n");
    assert_eq!(line, 3);
    assert!(reason.contains("fields"), "{reason}");
    let (_, _, reason) =
        err(b"{\"text\": \"a\", \"label\": 1}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n");
    assert!(reason.contains("earlier rows"), "{reason}");
}

#[test]
fn csv_with_quotes_and_multiline_fields() {
    let csv = b"text_a,text_b,label\n\"hello, world\",\"line one\nline two\",yes\nplain,\"say \"\"hi\"\"\",no\n";
    let recs = parse_records(csv).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].0, 2);
    assert_eq!(recs[1].0, 4, "the multi-line field spans lines 2-3");
    match &recs[1].1 {
        Record::Text {
            text,
            text_b,
            label,
        } => {
            assert_eq!(text, "plain");
            assert_eq!(text_b.as_deref(), Some("say \"hi\""));
            assert_eq!(label, &RawLabel::Str("no".into()));
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn streaming_reader_gives_the_same_result_in_any_chunking() {
    let data = b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\", \"label\": 1}";
    for chunk in [1, 3, 7, 1000] {
        let mut r = RecordReader::new();
        let mut got = Vec::new();
        let mut sink = |l: usize, _rec: Record| {
            got.push(l);
            Ok(())
        };
        for c in data.chunks(chunk) {
            r.feed(c, &mut sink).unwrap();
        }
        r.finish(&mut sink).unwrap();
        assert_eq!(got, vec![1, 2, 3]);
    }
}

#[test]
fn csv_quotes_across_chunk_boundaries_and_a_bom_in_any_chunking() {
    // Quoted newlines split across chunks keep their quote state; a byte-order mark (itself
    // split) is skipped; the rows and their lines are those of a single feed.
    let mut data = b"\xEF\xBB\xBF".to_vec();
    data.extend_from_slice(
        b"text_a,text_b,label\n\"a,\nb\",\"c\"\"\nd\",x\nplain,two,y\r\n\"last\nrow\",z,x",
    );
    let whole = parse_records(&data).unwrap();
    assert_eq!(
        whole.iter().map(|r| r.0).collect::<Vec<_>>(),
        [2, 5, 6],
        "{whole:?}"
    );
    for chunk in [1, 2, 3, 5, 8, 13] {
        let mut r = RecordReader::new();
        let mut got = Vec::new();
        let mut sink = |l: usize, rec: Record| {
            got.push((l, rec));
            Ok(())
        };
        for c in data.chunks(chunk) {
            r.feed(c, &mut sink).unwrap();
        }
        r.finish(&mut sink).unwrap();
        assert_eq!(got, whole, "chunk {chunk}");
    }
}

#[test]
fn jsonl_with_a_bom_is_jsonl_and_a_json_array_line_says_so() {
    let recs = parse_records(
        b"\xEF\xBB\xBF{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 0}\n",
    )
    .unwrap();
    assert_eq!(recs.len(), 2);
    let (line, _, reason) = err(b"[1, 2, 3]\n");
    assert_eq!(line, 1);
    assert!(
        reason.contains("expected a JSON object, found an array"),
        "{reason}"
    );
}

#[test]
fn task_inference_and_label_maps() {
    let recs =
        parse_records(b"{\"text\":\"a\",\"label\":\"pos\"}\n{\"text\":\"b\",\"label\":\"neg\"}\n")
            .unwrap();
    let (task, labels) = infer_task(&recs, None).unwrap();
    assert_eq!(task, Task::Classification { num_labels: 2 });
    assert_eq!(labels.unwrap().names, vec!["neg", "pos"]);
    let recs =
        parse_records(b"{\"text\":\"a\",\"label\":10}\n{\"text\":\"b\",\"label\":2}\n").unwrap();
    assert_eq!(
        infer_task(&recs, None).unwrap().1.unwrap().names,
        vec!["2", "10"]
    );
    let recs =
        parse_records(b"{\"text\":\"a\",\"label\":0.5}\n{\"text\":\"b\",\"label\":2}\n").unwrap();
    assert_eq!(infer_task(&recs, None).unwrap().0, Task::Regression);
    assert!(matches!(
        infer_task(&recs, Some("classification")),
        Err(Error::Data { line: 1, .. })
    ));
    let recs =
        parse_records(b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":1}\n").unwrap();
    assert!(
        matches!(infer_task(&recs, None), Err(Error::Data { .. })),
        "one class is not a task"
    );
}

#[test]
fn streaming_check_agrees_with_the_whole_file_in_any_chunking() {
    let files: [&[u8]; 3] = [
        b"{\"text\":\"a\",\"label\":\"pos\"}\n{\"text\":\"b\",\"label\":\"neg\"}\n",
        b"text,label\nx,0.5\ny,2\n",
        b"{\"prompt\":\"p\",\"completion\":\"c\"}\n",
    ];
    for data in files {
        let recs = parse_records(data).unwrap();
        let (task, _) = infer_task(&recs, None).unwrap();
        for chunk in [1, 4, 1000] {
            let mut c = StreamingCheck::new();
            for part in data.chunks(chunk) {
                c.feed(part).unwrap();
            }
            let got = c.finish().unwrap();
            assert_eq!((got.task, got.rows), (task.clone(), recs.len()));
        }
    }
    // A row of another shape fails at its own line, as the whole-file check does.
    let mut c = StreamingCheck::new();
    let e = c
        .feed(b"{\"text\":\"a\",\"label\":1}\n{\"prompt\":\"p\",\"completion\":\"c\"}\n")
        .unwrap_err();
    assert!(matches!(e, Error::Data { line: 2, .. }), "{e}");
}

#[test]
fn a_row_past_the_row_limit_or_too_many_classes_is_an_error_not_memory() {
    let mut c = StreamingCheck::new();
    c.feed(b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"")
        .unwrap();
    let filler = vec![b'x'; 1 << 20];
    let mut err = None;
    for _ in 0..=(MAX_ROW_BYTES >> 20) {
        if let Err(e) = c.feed(&filler) {
            err = Some(e);
            break;
        }
    }
    match err {
        Some(Error::Data {
            line: 2, reason, ..
        }) => assert!(reason.contains("longer than"), "{reason}"),
        e => panic!("{e:?}"),
    }
    let mut c = StreamingCheck::new();
    let mut rows = String::new();
    for i in 0..=MAX_CLASSES {
        rows.push_str(&format!("{{\"text\":\"t\",\"label\":\"class {i}\"}}\n"));
    }
    c.feed(rows.as_bytes()).unwrap();
    match c.finish() {
        Err(Error::Data {
            line,
            field,
            reason,
        }) => {
            assert_eq!((line, field.as_deref()), (MAX_CLASSES + 1, Some("label")));
            assert!(reason.contains("classes"), "{reason}");
        }
        r => panic!("{r:?}"),
    }
}

fn tiny_tokenizer(arch: Arch) -> (tempfile::TempDir, TextTokenizer) {
    let d = tempfile::tempdir().unwrap();
    sparsegrad_engine::testing::write_tiny_model_dir(d.path(), arch, 1).unwrap();
    let t = TextTokenizer::from_dir(d.path()).unwrap();
    (d, t)
}

#[test]
fn sft_masks_cover_completion_and_assistant_turns_only() {
    let (_d, tok) = tiny_tokenizer(Arch::Llama);
    let recs = vec![(
        1,
        Record::PromptCompletion {
            prompt: "hello how are".into(),
            completion: "you well".into(),
        },
    )];
    let (ex, _) = encode_records(&recs, &tok, &Task::CausalLm, None, 64).unwrap();
    let Target::Tokens(mask) = &ex[0].target else {
        panic!()
    };
    // hello how are | you well <eos>
    assert_eq!(ex[0].ids.len(), 6);
    assert_eq!(mask, &vec![0, 0, 0, 1, 1, 1]);

    let msgs = vec![
        Message {
            role: "user".into(),
            content: "hello".into(),
        },
        Message {
            role: "assistant".into(),
            content: "yes".into(),
        },
        Message {
            role: "user".into(),
            content: "what time".into(),
        },
        Message {
            role: "assistant".into(),
            content: "now".into(),
        },
    ];
    let text = tok.render_chat(&msgs, false).unwrap();
    assert_eq!(
        text,
        "<|user|>\nhello\n<|assistant|>\nyes<eos>\n<|user|>\nwhat time\n<|assistant|>\nnow<eos>\n"
    );
    let recs = vec![(1, Record::Chat { messages: msgs })];
    let (ex, _) = encode_records(&recs, &tok, &Task::CausalLm, None, 64).unwrap();
    let Target::Tokens(mask) = &ex[0].target else {
        panic!()
    };
    let vocab = tok.inner.get_vocab(true);
    let id = |w: &str| vocab[w];
    let trained: Vec<u32> = ex[0]
        .ids
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        trained,
        vec![id("yes"), id("<eos>"), id("now"), id("<eos>")]
    );
}

#[test]
fn truncation_and_seeded_order() {
    let (_d, tok) = tiny_tokenizer(Arch::Bert);
    let long = vec!["good"; 50].join(" ");
    let recs = vec![
        (
            1,
            Record::Text {
                text: long.clone(),
                text_b: None,
                label: RawLabel::Int(1),
            },
        ),
        (
            2,
            Record::Text {
                text: long.clone(),
                text_b: Some(long),
                label: RawLabel::Int(0),
            },
        ),
    ];
    // Rows of two shapes (a file could not mix them): the label map is given, not inferred.
    let labels = Some(sparsegrad_engine::data::LabelMap {
        names: vec!["0".into(), "1".into()],
    });
    let (ex, stats) = encode_records(
        &recs,
        &tok,
        &Task::Classification { num_labels: 2 },
        labels.as_ref(),
        16,
    )
    .unwrap();
    assert_eq!(stats.truncated, 2);
    assert!(ex.iter().all(|e| e.ids.len() == 16));
    assert_eq!(ex[0].ids[0], 0, "[CLS] survives truncation");
    assert_eq!(*ex[1].ids.last().unwrap(), 2, "[SEP] survives truncation");
    assert_eq!(epoch_order(100, 7, 0, true), epoch_order(100, 7, 0, true));
    assert_ne!(epoch_order(100, 7, 0, true), epoch_order(100, 7, 1, true));
    assert_ne!(epoch_order(100, 7, 0, true), epoch_order(100, 8, 0, true));
}

#[test]
fn hostile_chat_templates_stop_within_their_limits() {
    use sparsegrad_engine::data::{check_chat_template, DEFAULT_CHAT_TEMPLATE};
    check_chat_template(DEFAULT_CHAT_TEMPLATE).unwrap();
    // Three nested loops of 10^5 would run ~forever; the fuel stops them.
    let bomb = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}";
    let e = check_chat_template(bomb).unwrap_err().to_string();
    assert!(e.contains("fuel"), "{e}");
    // Output is capped too (each piece is small; there are many).
    let flood = "{% for a in range(10000) %}{{ 'y' * 100000 }}{% endfor %}";
    let e = check_chat_template(flood).unwrap_err().to_string();
    assert!(e.contains("wrote more than"), "{e}");
    let big = "x".repeat(100 << 10);
    let e = check_chat_template(&big).unwrap_err().to_string();
    assert!(e.contains("at most"), "{e}");
}
